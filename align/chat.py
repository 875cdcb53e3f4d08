"""`align chat PATH`: talk to a trained model in the terminal, through its own chat template, with the
R1 tags (`<think>`, `<answer>`) shown as the model wrote them.

PATH is a model folder (full checkpoint or PEFT adapter), a stage folder of a run (`RUN_DIR/STAGE`,
whose `model/` is used), or an embedded name (`align:tiny`). Each line read is one user turn; the
conversation is kept (oldest turns dropped when it outgrows the model's context). Lines starting
with `/` are commands: `/reset` (forget the conversation), `/system TEXT` (set the system prompt and
reset), `/exit`. On a terminal it prompts and shows the reasoning dimmed; reading from a pipe
(`echo "What is 2+3?" | align chat runs/quickstart/grpo`) it prints one reply per input line."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from align.console import quiet_libraries
from align.embedded import is_embedded
from align.generation import eos_and_pad_ids, generate
from align.models import device, load_causal_lm, load_tokenizer
from align.recipe.schema import ModelSpec

THINK = re.compile(r"(<think>.*?(?:</think>|$))", re.DOTALL)
DIM, RESET = "\033[2m", "\033[0m"


def resolve_chat_model(path: str) -> str:
    """The model folder PATH names: itself, or a stage folder's `model/`; embedded names pass through."""
    if is_embedded(path):
        return path
    folder = Path(path).expanduser()
    for candidate in (folder, folder / "model"):
        if (candidate / "config.json").exists() or (candidate / "adapter_config.json").exists():
            return str(candidate.resolve())
    raise FileNotFoundError(f"{path}: no model here (expected a model folder with config.json, or a stage folder "
                            "with model/ inside, e.g. runs/quickstart/grpo)")  # fmt: skip


def reply_text(token_ids: list[int], tokenizer: Any, end_ids: list[int]) -> str:
    """A reply as the model wrote it: special tokens kept (R1 tags may be special in a hub tokenizer,
    and `skip_special_tokens` would hide them), only the end-of-sequence and padding ids dropped."""
    kept = [t for t in token_ids if t not in end_ids]
    return tokenizer.decode(kept, skip_special_tokens=False).strip()


@dataclass
class ChatSession:
    """A loaded model and the conversation so far."""

    model: Any
    tokenizer: Any
    system: str | None = None
    temperature: float = 0.7
    max_new_tokens: int = 256
    seed: int = 0
    messages: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def load(cls, path: str, **kwargs: Any) -> ChatSession:
        quiet_libraries()  # no weight-loading bars between the user and the conversation
        spec = ModelSpec(name_or_path=resolve_chat_model(path))
        model = load_causal_lm(spec).to(device()).eval()
        return cls(model, load_tokenizer(spec, padding_side="left"), **kwargs)

    def reset(self) -> None:
        self.messages = []

    def _conversation(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        limit = getattr(self.model.config, "max_position_embeddings", None)
        turns = list(self.messages)
        # Drop the oldest exchange while the prompt would not leave room for the reply.
        while limit and len(turns) > 1:
            text = self.tokenizer.apply_chat_template(head + turns, tokenize=False, add_generation_prompt=True)
            if len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + self.max_new_tokens <= limit:
                break
            turns = turns[2:] if len(turns) > 2 else turns[-1:]
        self.messages = turns
        return head + turns

    def ask(self, text: str) -> str:
        """The model's reply to one user turn (which, with the reply, joins the conversation)."""
        self.messages.append({"role": "user", "content": text})
        conversation = self._conversation()
        sample = generate(self.model, self.tokenizer, [conversation], max_new_tokens=self.max_new_tokens,
                          temperature=self.temperature, seed=self.seed + len(self.messages))[0][0]  # fmt: skip
        eos_ids, pad_id = eos_and_pad_ids(self.model, self.tokenizer)
        reply = reply_text(sample.token_ids, self.tokenizer, [*eos_ids, pad_id])
        self.messages.append({"role": "assistant", "content": reply})
        return reply


def _show(reply: str, out: TextIO, tty: bool) -> None:
    out.write((THINK.sub(lambda m: f"{DIM}{m.group(1)}{RESET}", reply) if tty else reply) + "\n")
    out.flush()


def chat(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Read turns from `stdin` until it ends (or `/exit`), writing each reply to `stdout`."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    tty = stdin.isatty() and stdout.isatty()
    if tty:
        stdout.write("align chat: /reset forgets the conversation, /system TEXT sets the system prompt, /exit ends\n")
    while True:
        if tty:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            continue
        if text.startswith("/system"):
            session.system = text.removeprefix("/system").strip() or None
            session.reset()
            continue
        _show(session.ask(text), stdout, tty)
