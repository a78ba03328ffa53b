"""Tiny chat tokenizers built in-process (no downloads): a byte-level BPE trained on a few words, with the special
tokens of the ChatML, Llama-3 and Gemma chat templates, and a tiny random target of the same vocabulary."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dspark_lightning.targets import TargetConfig

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards hex every jovial bystander how can you "
         "write poem about sea explain why sky blue please list three facts").split()
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
# SmolLM2-135M-Instruct's template, verbatim: a default system prompt when the conversation has none.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
    " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA_TEMPLATE = (
    "{{ '<bos>' }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def build_chat_tokenizer(folder: Path, template: str = SMOLLM2_TEMPLATE, eos: str = "<|im_end|>") -> str:
    """Train the tiny BPE, set ``template``, save it to ``folder``; returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(0)
    tok.train_from_iterator([" ".join(rng.choices(WORDS, k=20)) for _ in range(200)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<|endoftext|>")
    fast.chat_template = template
    fast.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory) -> str:
    """A directory holding the tiny tokenizer with SmolLM2's chat template."""
    return build_chat_tokenizer(tmp_path_factory.mktemp("chat_tokenizer"))


@pytest.fixture(scope="session")
def tiny_chat_target(chat_tokenizer) -> TargetConfig:
    """A random Qwen3-shaped target whose vocabulary is the tiny tokenizer's."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(chat_tokenizer))
    return TargetConfig(tiny=dict(model_type="qwen3", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=512), seed=0)
