"""`align` command line: run, validate, status, recipes, rewards. Thin: parse, call, print."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description="The alignment pipeline from one YAML recipe.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks of errors (also: ALIGN_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="validate a recipe, then run its stages (skipping finished ones)")
    run.add_argument("recipe", type=Path)
    run.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. stages.sft.learning_rate=1e-4")
    run.add_argument("--run-dir", type=Path, help="default: ./runs/<recipe name>")
    run.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")

    validate = sub.add_parser("validate", help="check a recipe whole; train nothing")
    validate.add_argument("recipe", type=Path)
    validate.add_argument("overrides", nargs="*")
    validate.add_argument("--skip-model-check", action="store_true", help="do not look for model folders")

    status = sub.add_parser("status", help="show a run directory's stages")
    status.add_argument("run_dir", type=Path)

    recipes = sub.add_parser("recipes", help="work with recipes")
    recipes_sub = recipes.add_subparsers(dest="recipes_command", required=True)
    import_ = recipes_sub.add_parser("import", help="write an align recipe from an open-r1 / TRL GRPO config")
    import_.add_argument("config", type=Path, help="the YAML given to open-r1's grpo.py or `trl grpo --config`")
    import_.add_argument("-o", "--output", type=Path, help="write the recipe here (default: print it)")
    import_.add_argument("--num-processes", type=int, help="processes for the grpo stage (default: the fewest "
                         "the batch arithmetic allows)")

    rewards = sub.add_parser("rewards", help="list or try reward rules")
    rewards_sub = rewards.add_subparsers(dest="rewards_command", required=True)
    rewards_sub.add_parser("list", help="names, parameters and descriptions of the built-in rules")
    try_ = rewards_sub.add_parser("try", help="score one completion by hand")
    try_.add_argument("name")
    try_.add_argument("--completion", required=True)
    try_.add_argument("--solution")
    try_.add_argument("--param", action="append", default=[], metavar="K=V")
    return parser


def resolved_config(recipe: Any) -> dict[str, Any]:
    """The recipe with every default filled in, as `--print-config` shows it."""
    from align.runner import effective_config

    header = recipe.header.model_dump(mode="json", exclude={"stages"})
    stages = [effective_config(recipe, s).model_dump(mode="json") for s in recipe.stages]
    return {**header, "stages": stages}


def _cmd_run(args: argparse.Namespace) -> int:
    import yaml

    from align.recipe.validate import load_recipe
    from align.runner import StageFailed, render_report, run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(resolved_config(recipe), sort_keys=False), end="")
        return 0
    run_dir = args.run_dir or recipe.default_run_dir()
    print(f"[align] recipe {args.recipe} is valid ({len(recipe.stages)} stages); run dir: {run_dir}")
    try:
        manifest = run_recipe(recipe, run_dir)
    except KeyboardInterrupt:
        print("\n[align] interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except StageFailed as err:  # already reported, with the log's tail and path
        print(f"align: {err}; fix it and run the same command again to resume", file=sys.stderr)
        return 1
    print("\n" + render_report(manifest))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from align.recipe.validate import load_recipe

    recipe = load_recipe(args.recipe, args.overrides, check_models=not args.skip_model_check)
    print(f"{args.recipe}: OK — {len(recipe.stages)} stages: " + ", ".join(f"{s.name} ({s.type})" for s in recipe.stages))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from align.artifacts import Manifest
    from align.runner import render_report

    manifest = Manifest.read(args.run_dir)
    if manifest is None:
        print(f"{args.run_dir}: no manifest.json (not a run directory)", file=sys.stderr)
        return EXIT_USER_ERROR
    print(render_report(manifest))
    return 0


def _cmd_rewards(args: argparse.Namespace) -> int:
    from align.recipe.loader import parse_scalar
    from align.rewards import describe_rules, try_rule

    if args.rewards_command == "list":
        for rule in describe_rules():
            params = ", ".join(
                f"{k}: {v['type']}" + (" (required)" if v.get("required") else f" = {v['default']!r}")
                for k, v in rule["params"].items()
            )
            columns = f" [needs: {', '.join(rule['columns'])}]" if rule["columns"] else ""
            print(f"{rule['name']:<22} {rule['description']}{columns}")
            if params:
                print(f"{'':<22}   params: {params}")
        return 0
    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"--param {item!r} is not of the form k=v", file=sys.stderr)
            return EXIT_USER_ERROR
        params[key] = parse_scalar(value)
    print(try_rule(args.name, args.completion, args.solution, params))
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from align.recipe.importer import import_file

    text = import_file(args.config, args.output, args.num_processes)
    if args.output is None:
        print(text, end="")
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"[align] wrote {args.output}; check it with: align validate {args.output}")
    return 0


COMMANDS = {"run": _cmd_run, "validate": _cmd_validate, "status": _cmd_status, "recipes": _cmd_recipes,
            "rewards": _cmd_rewards}


def main(argv: list[str] | None = None) -> int:
    from align.recipe.errors import RecipeError

    args = _parser().parse_args(argv)
    debug = args.debug or bool(os.environ.get("ALIGN_DEBUG"))
    logging.basicConfig(level=os.environ.get("ALIGN_LOG_LEVEL", "INFO"), format="%(message)s")
    try:
        return COMMANDS[args.command](args)
    except RecipeError as err:
        print(err.render(), file=sys.stderr)
        return EXIT_USER_ERROR
    except (ValueError, OSError) as err:  # bad overrides, unknown rules, unwritable run dirs: the user's to fix
        if debug:
            raise
        print(f"align: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as err:  # a bug or an unforeseen failure: say what it was, the traceback on request
        if debug:
            raise
        print(f"align: {type(err).__name__}: {err} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
