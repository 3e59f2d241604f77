"""SepEn finetuning as a library; the command is `sepen finetune` (sepen.cli.finetune).

- `signal`: the image-free training signal, drawn per optimizer step (`Task`, `SignalSampler`);
- `conditioning`: frozen text conditioning and token positions (SD 1.x/2.x and SDXL);
- `loop`: set-up of the trainable keys and the capture, the optimisation loop on accelerate;
- `state`: checkpoints (sepen.checkpoints' protocol), the settings they depend on, the loss log.
"""
