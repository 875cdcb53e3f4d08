"""code rule and its sandbox: pass fractions, test-case formats, and escape attempts that must score 0.

Escape attempts are written so that even a broken sandbox cannot hurt the machine: the fork bomb
is bounded (at most 2**5 processes), signals use 0 (a probe), files go under pytest's tmp_path.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import pytest

from reward_rules import UnusableTestCasesWarning
from reward_rules._sandbox import can_drop_privileges, run_python
from reward_rules.code import code, extract_code, parse_test_cases

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
ADD_CASES = [
    {"input": "1 2\n", "output": "3\n"},
    {"input": "10 -4\n", "output": "6"},
    {"input": "0 0", "output": "0"},
]
FAST = {"timeout_s": 1.0, "memory_mb": 256}
SYSTEM_PYTHON = "/usr/bin/python3"


def fenced(source: str, lang: str = "python") -> str:
    return f"Here is my solution.\n```{lang}\n{source}```\nDone."


def run_one(source: str, cases: object = None, **params: object) -> float | None:
    cases = cases if cases is not None else [{"input": "", "output": "ok"}]
    return code([fenced(source)], [cases], **{**FAST, **params})[0]


def test_extract_code_takes_the_last_python_block() -> None:
    text = "```python\nprint(1)\n```\ntext\n```py\nprint(2)\n```\n```bash\nls\n```"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("```\nprint(1)\n```") is None  # unlabelled blocks are not taken
    assert extract_code("```python\nprint(1)\n") is None  # unclosed (truncated) block


def test_pass_fraction() -> None:
    assert run_one(ADD, ADD_CASES) == 1.0
    wrong = [*ADD_CASES[:2], {"input": "2 2", "output": "5"}]
    assert run_one(ADD, wrong) == pytest.approx(2 / 3)
    assert run_one("print(input())", [{"input": "x", "output": "x  \n\n"}]) == 1.0  # trailing whitespace
    assert code(["no code here"], [ADD_CASES], **FAST) == [0.0]


def test_test_case_formats() -> None:
    assert run_one(ADD, json.dumps(ADD_CASES)) == 1.0
    assert run_one(ADD, {"inputs": ["1 2", "3 4"], "outputs": ["3", "8"]}) == 0.5
    assert run_one(ADD, {"language": "python", "test_cases": ADD_CASES[:1]}) == 1.0
    asserts = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]
    assert run_one("def add(a, b):\n    return a + b\n", asserts) == pytest.approx(2 / 3)
    assert [c.expected for c in parse_test_cases([{"stdin": "1", "expected_output": "2"}])] == ["2"]


@pytest.mark.parametrize("cases", [[], "not json", {"foo": 1}, [{"input": "1"}], None, 5])
def test_unusable_test_cases_give_none_and_warn(cases: object) -> None:
    with pytest.warns(UnusableTestCasesWarning, match="sample 1"):
        out = code([fenced(ADD), fenced(ADD)], [ADD_CASES, cases], **FAST)
    assert out == [1.0, None]


def test_chat_messages_and_trl_kwargs() -> None:
    chat = [[{"role": "assistant", "content": fenced(ADD)}]]
    assert code(chat, [ADD_CASES], prompts=["q"], completion_ids=[[1]], trainer_state=None, **FAST) == [1.0]


def test_parallel_workers_give_the_same_scores() -> None:
    completions = [fenced(ADD), fenced("print(0)"), "none"]
    assert code(completions, [ADD_CASES] * 3, max_workers=2, **FAST) == [1.0, pytest.approx(1 / 3), 0.0]


# ----- escape attempts: each must score 0 for its test case, and the parent must carry on -----


def test_infinite_loop_times_out_and_skips_remaining_cases(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    # The package attribute `reward_rules.code` is the rule itself; the module is in sys.modules.
    code_module = importlib.import_module("reward_rules.code")

    runs: list[float] = []

    def counting_run(*args: object, **kwargs: object) -> object:
        result = run_python(*args, **kwargs)  # type: ignore[arg-type]
        runs.append(result.duration_s)
        return result

    monkeypatch.setattr(code_module, "run_python", counting_run)
    assert run_one("while True:\n    pass\n", ADD_CASES) == 0.0
    assert len(runs) == 1 and runs[0] < 4  # one timeout, then the other cases are skipped
    assert run_one("while True:\n    pass\n", ADD_CASES, skip_after_timeout=False) == 0.0
    assert len(runs) == 4
    assert run_one("import time\ntime.sleep(60)\n") == 0.0
    assert runs[-1] < 4


def test_fork_bomb_is_contained() -> None:
    bomb = "import os, time\nfor _ in range(5):\n    os.fork()\ntime.sleep(5)\nprint('ok')\n"
    start = time.monotonic()
    assert run_one(bomb) == 0.0
    assert time.monotonic() - start < 4
    result = run_python(bomb, **FAST)
    assert not result.ok and "os.fork" in result.stderr
    multiproc = (
        "import multiprocessing as mp\np = mp.Process(target=print)\np.start()\np.join()\nprint('ok')\n"
    )
    assert run_one(multiproc) == 0.0


@pytest.mark.parametrize(
    "source",
    [
        "import subprocess\nsubprocess.run(['true'])\nprint('ok')\n",
        "import os\nos.system('true')\nprint('ok')\n",
        "import os\nos.execv('/bin/echo', ['echo', 'ok'])\n",
        "import os\nos.posix_spawn('/bin/true', ['true'], {})\nprint('ok')\n",
    ],
)
def test_process_spawning_is_refused(source: str) -> None:
    assert run_one(source) == 0.0


def test_huge_allocation_fails_inside_the_child() -> None:
    assert run_one("x = bytearray(16 * 1024**3)\nprint('ok')\n") == 0.0
    grow = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))\n"
    # a longer timeout: touching the pages takes a while on a loaded machine
    result = run_python(grow, timeout_s=10, memory_mb=128)
    assert not result.ok and "MemoryError" in result.stderr


def test_writing_outside_the_workdir_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    attempts = [
        f"open({str(target)!r}, 'w').write('x')\nprint('ok')\n",
        f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nprint('ok')\n",
        f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
        "os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)\nprint('ok')\n",
        f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')\nprint('ok')\n",
        "open('../../../../../../../../tmp/align-escape-test.txt', 'w').write('x')\nprint('ok')\n",
        f"import os\nos.chdir({str(tmp_path)!r})\nopen('escaped.txt', 'w').write('x')\nprint('ok')\n",
    ]
    for source in attempts:
        assert run_one(source) == 0.0, source
    assert not target.exists()
    assert not Path("/tmp/align-escape-test.txt").exists()


def test_deleting_files_is_refused(tmp_path: Path) -> None:
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    attempts = [
        f"import os\nos.remove({str(keep)!r})\nprint('ok')\n",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})\nprint('ok')\n",
        f"import os\nos.rename({str(keep)!r}, 'stolen.txt')\nprint('ok')\n",
        f"import os\nos.chmod({str(keep)!r}, 0o000)\nprint('ok')\n",
        f"open({str(keep)!r}, 'r+').truncate(0)\nprint('ok')\n",
    ]
    for source in attempts:
        assert run_one(source) == 0.0, source
    assert keep.read_text() == "precious"
    assert oct(keep.stat().st_mode & 0o777) != oct(0)


def test_network_and_other_escapes_are_refused() -> None:
    attempts = [
        "import socket\nsocket.socket()\nprint('ok')\n",
        "import socket\nsocket.create_connection(('127.0.0.1', 9))\nprint('ok')\n",
        "import os\nos.kill(os.getppid(), 0)\nprint('ok')\n",  # signal 0: a harmless probe
        "import ctypes\nprint('ok')\n",
        "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\nprint('ok')\n",
        "import gc\ngc.get_objects()\nprint('ok')\n",
    ]
    for source in attempts:
        assert run_one(source) == 0.0, source


def test_workdir_is_usable_then_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    source = "import os\nopen('scratch.txt', 'w').write('hi')\nos.mkdir('d')\nos.remove('scratch.txt')\nprint('ok')\n"
    result = run_python(source, **FAST)
    assert result.ok and result.stdout == "ok\n"
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_output_is_capped() -> None:
    result = run_python("while True:\n    print('x' * 10000)\n", max_output_bytes=100_000, **FAST)
    assert not result.ok and result.truncated and len(result.stdout) == 100_000


@pytest.mark.skipif(not can_drop_privileges(SYSTEM_PYTHON), reason="needs root and a world-readable python")
def test_kernel_layers_without_the_audit_hook(tmp_path: Path) -> None:
    # Running as nobody, RLIMIT_NPROC and file permissions hold even with the audit hook off.
    forks = (
        "import os, time\npids = []\nfor _ in range(10):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(3)\n        os._exit(0)\n"
        "    pids.append(pid)\nprint(len(pids))\n"
    )
    result = run_python(forks, python=SYSTEM_PYTHON, audit_hook=False, max_processes=4, **FAST)
    assert result.ok and int(result.stdout) <= 3
    os.chmod(tmp_path, 0o755)  # root-owned and not writable by others
    write = f"open({str(tmp_path / 'x.txt')!r}, 'w').write('x')\n"
    result = run_python(write, python=SYSTEM_PYTHON, audit_hook=False, **FAST)
    assert not result.ok and "PermissionError" in result.stderr
    assert not (tmp_path / "x.txt").exists()
    ok = run_python("import os\nprint(os.getuid() != 0)\n", python=SYSTEM_PYTHON, **FAST)
    assert ok.stdout == "True\n"


def test_binary_scores_all_passed_as_one_and_anything_less_as_zero() -> None:
    # open-r1's binary_code: 1.0 when the pass rate is above 0.99, else 0.0.
    wrong = [*ADD_CASES[:2], {"input": "2 2", "output": "5"}]  # 2 of 3 pass
    assert run_one(ADD, ADD_CASES, binary=True) == 1.0
    assert run_one(ADD, wrong, binary=True) == 0.0
    assert run_one(ADD, wrong, binary=True, binary_threshold=0.5) == 1.0  # 2/3 > 0.5
    assert code(["no code"], [ADD_CASES], binary=True, **FAST) == [0.0]
    with pytest.warns(UnusableTestCasesWarning):
        assert code([fenced(ADD)], [[]], binary=True, **FAST) == [None]  # unusable stays None
    with pytest.raises(ValueError, match="binary_threshold"):
        run_one(ADD, ADD_CASES, binary=True, binary_threshold=1.0)


def r1(answer: str, think: str = "\nLet's solve this\n") -> str:
    return f"<think>{think}</think>\n<answer>\n{answer}\n</answer>"


def test_code_format_wants_the_r1_format_and_a_fenced_block_of_the_language_in_the_answer() -> None:
    from reward_rules.code import code_format

    python = "```python\ndef hello():\n    print('world')\n```"
    cases = [
        (r1(python), 1.0),
        (r1("```py\nx = 1\n```"), 1.0),  # the usual alias
        (r1("```Python3 \nx = 1\n```"), 1.0),  # case and a trailing space in the info string
        (r1("Explanation first.\n" + python + "\nThat is all."), 1.0),  # prose around the block is fine
        (r1(python, think="\n```python\nx = 1\n```\nNow the solution:\n"), 1.0),  # blocks in the think part too
        (python, 0.0),  # no think/answer tags
        (r1("Just plain text"), 0.0),  # no code block
        (r1("```javascript\nconsole.log('hello');\n```"), 0.0),  # another language
        (r1("```\ndef hello(): pass\n```"), 0.0),  # no language label
        (r1("```python\ndef hello(): pass"), 0.0),  # block never closed (cut off)
        (f"<answer>{python}</answer><think>Analysis</think>", 0.0),  # wrong order
        (r1("Only prose.", think="\n```python\nx = 1\n```\n"), 0.0),  # the code is in the think part only
        (r1(python) + "\nextra", 0.0),  # text after </answer>
    ]
    assert code_format([text for text, _ in cases]) == [score for _, score in cases]
    js = r1("```javascript\nconsole.log('hello');\n```")
    assert code_format([js], language="javascript") == [1.0]
    assert code_format([js, r1(python)], language=["js", "python"]) == [1.0, 1.0]  # per-sample column
    assert code_format([[{"role": "assistant", "content": r1(python)}]]) == [1.0]
    assert code_format(["<think>" + r1(python)[len("<think>"):]], prefilled_think=True) == [0.0]
    assert code_format([r1(python)[len("<think>"):]], prefilled_think=True) == [1.0]
