"""`align` command line: run, validate, status, report, chat, recipes, rewards. Thin: parse, call, print."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_USER_ERROR = 2
#: Commands whose extra `key.path=value` words are recipe overrides, wherever they stand on the line.
TAKES_OVERRIDES = ("run", "validate")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description="The alignment pipeline from one YAML recipe.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks of errors (also: ALIGN_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="validate a recipe, then run its stages (skipping finished ones)")
    run.add_argument("recipe", type=Path)
    run.add_argument("overrides", nargs="*", help="key.path=value overrides (anywhere on the line), e.g. stages.sft.learning_rate=1e-4")
    run.add_argument("--run-dir", type=Path, help="default: ./runs/<recipe name>")
    run.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    machines = run.add_argument_group("several machines", "start `align run` once per machine, with the same recipe "
                                      "and a run dir on a shared filesystem; default: SLURM's or torchrun's environment "
                                      "(SLURM_NNODES/SLURM_NODEID or NNODES/NODE_RANK, MASTER_ADDR, MASTER_PORT)")
    machines.add_argument("--num-machines", type=int, help="machines taking part in the run")
    machines.add_argument("--machine-rank", type=int, help="this machine's rank: 0 runs the recipe, the others follow")
    machines.add_argument("--main-process-ip", help="machine 0's address, which every rank connects to")
    machines.add_argument("--main-process-port", type=int, help="the port on machine 0 (default: accelerate's, 29500)")

    validate = sub.add_parser("validate", help="check a recipe whole; train nothing")
    validate.add_argument("recipe", type=Path)
    validate.add_argument("overrides", nargs="*", help="key.path=value overrides (anywhere on the line)")
    validate.add_argument("--skip-model-check", action="store_true", help="do not look for model folders")

    status = sub.add_parser("status", help="show a run directory's stages, and a running stage's progress and ETA")
    status.add_argument("run_dir", type=Path)

    report = sub.add_parser("report", help="write report.html and report.md (with plots) into a run directory")
    report.add_argument("run_dir", type=Path)

    chat = sub.add_parser("chat", help="chat with a model in the terminal (reads stdin when it is not a terminal)")
    chat.add_argument("path", help="a model folder, a stage folder (RUN_DIR/STAGE) or an embedded model (align:tiny)")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default 0.7)")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--seed", type=int, default=0)

    recipes = sub.add_parser("recipes", help="the shipped recipes: list them (default) or copy one to edit")
    recipes_sub = recipes.add_subparsers(dest="recipes_command")
    for name, (help_text, add_arguments, _) in RECIPES_COMMANDS.items():
        add_arguments(recipes_sub.add_parser(name, help=help_text))

    rewards = sub.add_parser("rewards", help="list or try reward rules")
    rewards_sub = rewards.add_subparsers(dest="rewards_command", required=True)
    rewards_sub.add_parser("list", help="names, parameters and descriptions of the built-in rules")
    try_ = rewards_sub.add_parser("try", help="score one completion by hand")
    try_.add_argument("name")
    try_.add_argument("--completion", required=True)
    try_.add_argument("--solution")
    try_.add_argument("--param", action="append", default=[], metavar="K=V")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse a command line; for `run` and `validate`, `key.path=value` words count as overrides
    wherever they stand (after `--run-dir D` too, as LLaMA-Factory and torchtune users type them)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command not in TAKES_OVERRIDES or any(word.startswith("-") or "=" not in word for word in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def resolved_config(recipe: Any) -> dict[str, Any]:
    """The recipe with every default filled in, as `--print-config` shows it."""
    from align.runner import effective_config

    header = recipe.header.model_dump(mode="json", exclude={"stages"})
    stages = [effective_config(recipe, s).model_dump(mode="json") for s in recipe.stages]
    return {**header, "stages": stages}


def _cmd_run(args: argparse.Namespace) -> int:
    import yaml

    from align.preempt import EXIT_INTERRUPTED, Interrupted
    from align.recipe.validate import load_recipe
    from align.runner import StageFailed, render_report, run_recipe

    machines = _machines(args)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(resolved_config(recipe), sort_keys=False), end="")
        return 0
    run_dir = args.run_dir or recipe.default_run_dir()
    _print_notices(recipe)
    print(f"[align] recipe {args.recipe} is valid ({len(recipe.stages)} stages); run dir: {run_dir}")
    try:
        manifest = run_recipe(recipe, run_dir, command=args.command_line, machines=machines)
    except (Interrupted, KeyboardInterrupt) as err:
        print(f"\n[align] interrupted ({err or 'Ctrl-C'}); run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except StageFailed as err:  # already reported, with the log's tail and path
        print(f"align: {err}; fix it and run the same command again to resume", file=sys.stderr)
        return 1
    print("\n" + render_report(manifest))
    return 0


def _machines(args: argparse.Namespace) -> Any:
    """The machines of this run: the flags, over what SLURM's or torchrun's environment says."""
    import dataclasses

    from align.launch import Machines

    found = Machines.from_env()
    flags = {"num_machines": args.num_machines, "machine_rank": args.machine_rank,
             "main_process_ip": args.main_process_ip, "main_process_port": args.main_process_port}  # fmt: skip
    found = dataclasses.replace(found, **{k: v for k, v in flags.items() if v is not None})
    if problems := found.problems():
        raise ValueError("; ".join(problems))  # reported as the user's to fix (exit 2)
    return found


def _print_notices(recipe: Any) -> None:
    for notice in recipe.notices:
        print(f"notice: {notice}")


def _cmd_validate(args: argparse.Namespace) -> int:
    from align.recipe.validate import load_recipe

    recipe = load_recipe(args.recipe, args.overrides, check_models=not args.skip_model_check)
    _print_notices(recipe)
    print(f"{args.recipe}: OK — {len(recipe.stages)} stages: " + ", ".join(f"{s.name} ({s.type})" for s in recipe.stages))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from align import artifacts as art
    from align.runner import progress_lines, render_report

    try:
        manifest = art.Manifest.read(args.run_dir)
    except art.ManifestError as err:
        print(f"align: {err}\n  `align run` with this run dir moves it aside and rebuilds it from the finished stage "
              "folders (each holds its result.json)", file=sys.stderr)  # fmt: skip
        return EXIT_USER_ERROR
    if manifest is None:
        print(f"{args.run_dir}: no manifest.json (not a run directory)", file=sys.stderr)
        return EXIT_USER_ERROR
    holder = art.lock_holder(args.run_dir)
    running = [s for s in manifest.stages if s.status == art.RUNNING]
    if holder:
        print(f"run: live ({holder})")
    elif running:
        print(f"run: not running — stage '{running[0].name}' was killed while it ran; `align run` again resumes it")
    else:
        print("run: not running")
    print(render_report(manifest))
    progress = progress_lines(args.run_dir, manifest) if holder else []
    if progress:
        print("\nRunning\n" + "\n".join(progress))
    for stage in manifest.stages:
        if stage.status in (art.FAILED, art.INTERRUPTED) and stage.error:
            print(f"\n{stage.name} {stage.status}: {stage.error}\n  log: {art.scratch_dir(args.run_dir, stage.name) / art.LOG}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from align.report import write_report

    html, markdown = write_report(args.run_dir)
    print(f"{html}\n{markdown}")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from align.chat import ChatSession, chat

    session = ChatSession.load(args.path, system=args.system, temperature=args.temperature,
                               max_new_tokens=args.max_new_tokens, seed=args.seed)  # fmt: skip
    return chat(session)


# ---- align recipes: one entry per subcommand in RECIPES_COMMANDS ---------------------------------


def _recipes_list(args: argparse.Namespace) -> int:
    from align.catalog import recipes_dir, shipped_recipes

    recipes = shipped_recipes()
    width = max((len(r.name) for r in recipes), default=0)
    for recipe in recipes:
        print(f"{recipe.name:<{width}}  {recipe.summary}")
    print(f"\n({recipes_dir()}; copy one with: align recipes copy NAME [DEST])")
    return 0


def _copy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="a shipped recipe (see `align recipes`), e.g. quickstart")
    parser.add_argument("dest", nargs="?", help="a file, or a folder (existing, or ending in /); default: the current folder")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")


def _recipes_copy(args: argparse.Namespace) -> int:
    from align.catalog import copy_recipe

    written = copy_recipe(args.name, args.dest, force=args.force)
    print(f"copied {args.name} to {written[0]}" + "".join(f"\n  with {p}" for p in written[1:]))
    print(f"run it: align run {written[0]}")
    return 0


def _import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="the YAML given to open-r1's grpo.py or `trl grpo --config`")
    parser.add_argument("-o", "--output", type=Path, help="write the recipe here (default: print it)")
    parser.add_argument("--num-processes", type=int, help="processes for the grpo stage (default: the fewest "
                        "the batch arithmetic allows)")


def _recipes_import(args: argparse.Namespace) -> int:
    from align.recipe.importer import import_file

    text = import_file(args.config, args.output, args.num_processes)
    if args.output is None:
        print(text, end="")
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"[align] wrote {args.output}; check it with: align validate {args.output}")
    return 0


#: `align recipes <name>`: (help, add the subcommand's arguments, run it). A new subcommand is one entry.
RECIPES_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "list": ("the shipped recipes, each with its first comment line", lambda parser: None, _recipes_list),
    "copy": ("copy a shipped recipe to edit (with the accelerate configs it names)", _copy_arguments, _recipes_copy),
    "import": ("write an align recipe from an open-r1 / TRL GRPO config", _import_arguments, _recipes_import),
}


def _cmd_recipes(args: argparse.Namespace) -> int:
    return RECIPES_COMMANDS[args.recipes_command or "list"][2](args)


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


COMMANDS = {"run": _cmd_run, "validate": _cmd_validate, "status": _cmd_status, "report": _cmd_report,
            "chat": _cmd_chat, "recipes": _cmd_recipes, "rewards": _cmd_rewards}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from align.artifacts import RunDirInUse
    from align.console import setup_console
    from align.recipe.errors import RecipeError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.command_line = shlex.join(["align", *argv])
    debug = args.debug or bool(os.environ.get("ALIGN_DEBUG"))
    setup_console()
    try:
        return COMMANDS[args.command](args)
    except RecipeError as err:
        print(err.render(), file=sys.stderr)
        return EXIT_USER_ERROR
    except (ValueError, OSError, RunDirInUse) as err:  # bad overrides, unknown rules, run dirs: the user's to fix
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
