"""An input that leaves nothing to work on is an error naming the file and what dropped its rows: empty files,
rows all dropped by ``min_loss_tokens`` / ``max_length``, a cache with no samples (regen, cache build/estimate/verify,
the online conversations DataModule)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dspark_lightning.data.cache.build import build_cache, estimate_cache
from dspark_lightning.data.cache.format import CacheError
from dspark_lightning.data.conversations import read_conversations
from dspark_lightning.data.online import ConversationsDataModule, RandomTokensDataModule
from dspark_lightning.data.regen import regen
from dspark_lightning.targets import TargetConfig

TINY = dict(model_type="qwen3", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128)
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def word_tokenizer(folder: Path) -> Path:
    """A word-level fast tokenizer with a ChatML template, saved as a model directory a TargetConfig can name."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hi", "there", "\n"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\|im_start\|>|<\|im_end\|>|\n| "), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**TINY, "architectures": ["Qwen3ForCausalLM"]}))
    return folder


def rows(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": i, "conversations": [{"role": "user", "content": "hi"},
                                                                   {"role": "assistant", "content": "there"}]}) + "\n"
                            for i in range(n)))
    return path


def test_an_empty_file_is_refused_everywhere(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    message = f"{empty} holds no rows"
    with pytest.raises(ValueError, match=message):
        read_conversations(empty)
    with pytest.raises(ValueError, match=message):
        regen(str(empty), str(tmp_path / "out.jsonl"), progress=False)
    target = TargetConfig(tiny=TINY)
    with pytest.raises(ValueError, match=message):
        estimate_cache(str(empty), target, [0])
    with pytest.raises(ValueError, match=message):
        build_cache(str(empty), str(tmp_path / "cache"), target, [0], progress=False)
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "cache" / "manifest.json").exists()


def test_rows_all_dropped_name_the_file_and_the_filter(tmp_path):
    tok = word_tokenizer(tmp_path / "tok")
    convo = rows(tmp_path / "conv.jsonl", 3)
    target = TargetConfig(tiny=TINY)
    dropped = (rf"No sample of \['{convo}'\] is left: all 3 rows were dropped by min_loss_tokens=14 \(fewer trainable "
               rf"assistant tokens once truncated to max_length=4096\)")
    with pytest.raises(ValueError, match=dropped):
        estimate_cache(str(convo), target, [0], tokenizer=str(tok))
    with pytest.raises(CacheError, match=dropped):
        build_cache(str(convo), str(tmp_path / "cache"), target, [0], tokenizer=str(tok), progress=False)
    assert not (tmp_path / "cache" / "manifest.json").exists()  # nothing that looks like a finished cache
    with pytest.raises(ValueError, match=r"max_samples=0 leaves no rows"):
        estimate_cache(str(convo), target, [0], tokenizer=str(tok), max_samples=0, min_loss_tokens=1)
    assert estimate_cache(str(convo), target, [0], tokenizer=str(tok), min_loss_tokens=1)["samples"] == 3

    data = ConversationsDataModule(TargetConfig(path=str(tok)), path=str(convo), max_length=1, val_fraction=0.0)
    with pytest.raises(ValueError, match=rf"All 3 conversations of {convo} were dropped: none has an assistant token "
                                         rf"\(after its first token\) within max_length=1"):
        data.setup("fit")


def test_too_few_samples_for_one_batch_is_an_error():
    data = RandomTokensDataModule(num_samples=8, seq_len=16, batch_size=4, val_fraction=0.625)
    with pytest.raises(ValueError, match=r"3 training samples \(8 in all, 5 held out by val_fraction=0.625\) fill no "
                                         r"batch of batch_size=4"):
        data.setup("fit")
