"""Build the tiny tokenizer shipped in this folder (run once; its output is committed).

    python -m wire.tokenizer.build

A byte-level BPE, trained with Hugging Face's ``tokenizers`` on a few lines of
the text sessctl sends and its chaos upstream answers, saved as a Hugging Face
tokenizer directory (``tokenizer.json``, ``tokenizer_config.json`` with the
chat template, ``special_tokens_map.json``). A session server that tokenizes
itself (and calls SGLang's native ``/generate`` with ``input_ids``) loads this
directory as its tokenizer (its ``hf_checkpoint`` or ``tokenizer_path``), so the
chaos upstream can read the step marker back out of the ids. Byte-level: any
text encodes, whatever the merges. Not imported at run time (``wire.tokens``
reads the files with no dependency).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system{{ '\\n' }}<tools>"
    "{% for tool in tools %} {{ tool['function']['name'] }}{% endfor %}"
    "</tools><|im_end|>{{ '\\n' }}{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}{{ '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}<tool_call>"
    "{\"name\": \"{{ call['function']['name'] }}\", "
    "\"arguments\": {{ call['function']['arguments'] }}}</tool_call>{% endfor %}"
    "<|im_end|>{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)
"""ChatML, with tools listed by name and tool calls as Hermes-style
``<tool_call>`` JSON (the form Qwen's parsers read). No literal newline and no
``tojson``, so Jinja's whitespace options and JSON filters cannot change it;
``wire.tokens.render_chat`` renders it the same in plain Python."""

CORPUS = [
    "turn answer to turn user assistant system tool [[sessctl:run.step]] sessctl chaos",
    '<tool_call>{"name": "sessctl_step", "arguments": {"turn": "0a1b2c3d"}}</tool_call>',
    "hello hi the a of and is in to it you I answer myself stale writer delete chat get",
    "0123456789 abcdef ABCDEF . , : ; - _ / [ ] { } ( ) \" ' \n",
]


def build(out: Path = HERE) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 50, trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 131072,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


if __name__ == "__main__":
    build()
