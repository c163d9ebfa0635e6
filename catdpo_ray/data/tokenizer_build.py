"""Train the tiny model's tokenizer: a small deterministic byte-level BPE.

Byte-level, so any text (including unseen words and non-ASCII) round-trips; a prefix space is
added before pre-tokenization, so ``"word"`` and ``" word"`` encode alike and a response encoded
on its own (``catdpo_ray.data.tokenize.encode_response`` prepends a space) gets the same tokens
as inside the full sequence. ``<s>`` is prepended by the post-processor for plain ``encode``;
``apply_chat_template`` output starts with ``<s>`` itself and is tokenized with
``add_special_tokens=False``, matching the Llama-2 convention.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
#: Special tokens in id order: ids 0..3.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
#: ``[{"role": "user", "content": p}]`` + generation prompt renders as ``<s>USER: p ASSISTANT:``,
#: i.e. BOS + the config's default ``data.prompt_template``; an assistant turn ends with ``</s>``.
CHAT_TEMPLATE: str = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] | trim }} "
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] | trim }}"
    "{% elif message['role'] == 'assistant' %} ASSISTANT: {{ message['content'] | trim }}{{ eos_token }} "
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def train_tokenizer(
    texts: Iterable[str],
    out_dir: Path,
    vocab_size: int = 2048,
    *,
    model_max_length: int = 256,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and save it (``save_pretrained``) into ``out_dir``.

    Deterministic: the same texts in the same order give the same vocabulary and merges.

    Args:
        texts: training texts (prompts and responses).
        out_dir: directory for ``tokenizer.json`` / ``tokenizer_config.json``; created if missing.
        vocab_size: target vocabulary size including the 4 special tokens and 256 byte tokens.
        model_max_length: the tokenizer's ``model_max_length`` (the tiny model's context length).

    Returns:
        The loaded fast tokenizer; ``AutoTokenizer.from_pretrained(out_dir)`` returns the same.
    """
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    # transformers 5 records its backend class name, which 4.x cannot resolve; the generic fast
    # class name loads the same tokenizer.json under both.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return fast


__all__ = ["BOS", "CHAT_TEMPLATE", "EOS", "PAD", "SPECIAL_TOKENS", "UNK", "train_tokenizer"]
