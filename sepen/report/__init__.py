"""The report's parts as a library; the command is `sepen report` (sepen.cli.report).

- `tables`: the headline, metrics tables with CIs and paired differences, the landing text;
- `figures`: failure taxonomy, sample grid, loss curves;
- `attention_maps`: object-token cross-attention maps before and after finetuning.
"""
