"""`sepen models`: every model a config needs (base model, CLIP, BLIP, detector, FID
weights), present or missing; --download fetches the missing ones."""

from __future__ import annotations

import argparse

from sepen.command import command_parser, config_from, run_step
from sepen.errors import ModelNotAvailableError
from sepen.models.required import about, check_all, fetch, problem, requirements


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("sepen models", "Every model a config needs, and whether it is here.")
    p.add_argument(
        "--download", action="store_true", help="fetch the missing ones (needs internet)"
    )
    return p


def main(args: argparse.Namespace) -> None:
    config = config_from(args)
    missing = []
    for req in requirements(config):
        why = problem(req)
        print(f"{'present' if why is None else 'MISSING'}  {req.label()}")
        if about(req):
            print(f"         {about(req)}")
        if why is not None:
            missing.append(req)
    if args.download:
        for req in missing:
            print(f"downloading {req.label()} ...")
            try:
                fetch(req)
            except Exception as err:  # noqa: BLE001 - name the model and go on
                raise ModelNotAvailableError(
                    f"could not download {req.label()}: {err}: check the name and the "
                    f"connection (HF_ENDPOINT, proxies)"
                ) from err
        check_all(config)
    elif missing:
        print(f"{len(missing)} missing: run `sepen models --config {args.config} --download`")


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen models", lambda: main(args))
