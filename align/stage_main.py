"""`python -m align.stage_main --run-dir D --stage NAME --base-dir B`: one stage in its own process
(what `subprocess` and `accelerate` launchers start)."""

from align.runner import main_stage_process

if __name__ == "__main__":
    main_stage_process()
