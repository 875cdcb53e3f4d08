"""Tokenizers shaped like the hub's, built locally (no download) on the embedded model.

Each fixture is a model folder: align:tiny's weights (embeddings resized to the new tokens) with a
tokenizer and generation config that behave like a real family's:

- `qwen2.5-base`: ChatML turns that end with `<|im_end|>`, but EOS `<|endoftext|>` and pad = EOS
  (Qwen2.5 base models, e.g. Qwen2.5-Math-7B);
- `llama3-instruct`: header-style turns ending `<|eot_id|>`, BOS written by the template, several EOS
  ids in `generation_config.json`, no pad token;
- `no-pad`: ChatML with EOS `<|im_end|>` and no pad token at all;
- `adds-bos`: a tokenizer whose encoder prepends `<s>` to raw text ([INST] turns ending `</s>`).

`trained_fixture` also teaches a fixture model, with the sft stage itself, to answer arithmetic in
the R1 format and end its turn, so generation paths can be checked for where they stop.
"""

from __future__ import annotations

import json
from pathlib import Path

FIXTURES = ("qwen2.5-base", "llama3-instruct", "no-pad", "adds-bos")

CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)
INST = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '<s>[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] + '</s>' }}"
    "{%- else -%}{{ message['content'] + '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
)

#: Per fixture: added special tokens, chat template, eos, pad (None: none), bos, the generation
#: config's EOS token names, and the token that ends an assistant turn.
SHAPES: dict[str, dict[str, object]] = {
    "qwen2.5-base": {"tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "template": CHATML,
                     "eos": "<|endoftext|>", "pad": "<|endoftext|>", "bos": None,
                     "generation_eos": ["<|endoftext|>"], "end_of_turn": "<|im_end|>"},
    "llama3-instruct": {"tokens": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"], "template": LLAMA3,
                        "eos": "<|eot_id|>", "pad": None, "bos": "<|begin_of_text|>",
                        "generation_eos": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], "end_of_turn": "<|eot_id|>"},
    "no-pad": {"tokens": ["<|im_start|>", "<|im_end|>"], "template": CHATML, "eos": "<|im_end|>", "pad": None,
               "bos": None, "generation_eos": ["<|im_end|>"], "end_of_turn": "<|im_end|>"},
    "adds-bos": {"tokens": ["<s>", "</s>"], "template": INST, "eos": "</s>", "pad": None, "bos": "<s>",
                 "generation_eos": ["</s>"], "end_of_turn": "</s>"},
}  # fmt: skip


def build_fixture(name: str, out_dir: Path) -> Path:
    """Write the fixture's model folder (untrained: align:tiny's weights) into `out_dir`."""
    import torch
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from align.embedded import embedded_model_path

    shape = SHAPES[name]
    base = embedded_model_path("align:tiny")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": list(shape["tokens"])})  # type: ignore[arg-type]
    tokenizer.eos_token = shape["eos"]
    tokenizer.bos_token = shape["bos"]
    tokenizer.pad_token = shape["pad"]
    tokenizer.chat_template = shape["template"]
    if name == "adds-bos":
        bos_id = tokenizer.convert_tokens_to_ids("<s>")
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(0)  # new rows are drawn around the old embeddings' mean: the same fixture every time
    model.resize_token_embeddings(len(tokenizer))
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in shape["generation_eos"]]  # type: ignore[union-attr]
    model.config.eos_token_id = eos_ids[0]
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def end_of_turn_id(folder: Path) -> int:
    from transformers import AutoTokenizer

    name = next(n for n in SHAPES if folder.name.startswith(n))
    return AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(SHAPES[name]["end_of_turn"])


TRAIN_RECIPE = """\
name: fixture
seed: 0
model: {model}
stages:
  - name: sft
    type: sft
    dataset: {{path: "align:arithmetic", split: train, num_examples: 1200, params: {{max_operand: 30}}}}
    learning_rate: 5.0e-3
    lr_scheduler_type: constant
    max_steps: 80
    per_device_train_batch_size: 32
    logging_steps: 50
    max_length: 96
"""


def trained_fixture(name: str, root: Path) -> Path:
    """The fixture taught (by align's own sft stage) to answer in the R1 format and end its turn."""
    from align.recipe.validate import load_recipe
    from align.runner import run_recipe

    untrained = build_fixture(name, root / f"{name}-untrained")
    recipe_file = root / f"{name}.yaml"
    recipe_file.write_text(TRAIN_RECIPE.format(model=json.dumps(str(untrained))))
    manifest = run_recipe(load_recipe(recipe_file), root / f"{name}-run", report=lambda _: None)
    record = manifest.record("sft")
    assert record.status == "complete", record.error
    trained = root / f"{name}-run" / record.artifacts["model"]
    target = root / name
    trained.rename(target)
    return target


def with_context(embedded: str, root: Path, context: int) -> Path:
    """A copy of an embedded model whose config holds `context` positions (RoPE has no position table,
    so only the number changes): stands in for a hub model of that context, e.g. Qwen2.5-Math's 4096."""
    import shutil

    from align.embedded import embedded_model_path

    target = root / f"{embedded.replace(':', '-')}-ctx{context}"
    if not target.exists():
        shutil.copytree(embedded_model_path(embedded), target)
        config = json.loads((target / "config.json").read_text())
        config["max_position_embeddings"] = context
        (target / "config.json").write_text(json.dumps(config))
    return target


def hub_cache_with_configs(cache: Path, configs: dict[str, dict[str, object]]) -> Path:
    """A Hugging Face hub cache (HF_HUB_CACHE) holding only the given repos' config.json files, laid
    out as `huggingface_hub` lays out a download, so offline lookups of those hub ids find them."""
    for repo, config in configs.items():
        folder = cache / f"models--{repo.replace('/', '--')}"
        commit = "0" * 40
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(commit)
        snapshot = folder / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / "config.json").write_text(json.dumps(config))
    return cache
