"""De-duplication and the held-out filter: normalisation, exact Jaccard, MinHash LSH candidates, n-gram overlap."""

from __future__ import annotations

import pytest

from dspark_lightning.data.dedup import HeldoutFilter, NearDuplicateIndex, jaccard, normalise, shingles, words

GSM8K_1 = ("Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
           "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck "
           "egg. How much in dollars does she make every day at the farmers' market?\nPlease reason step by step, "
           "and put your final answer within \\boxed{}.")
SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."


def test_normalise_ignores_case_spacing_and_punctuation():
    assert words("Hello,  WORLD!\nIt's  2 p.m.") == ["hello", "world", "it", "s", "2", "p", "m"]
    assert normalise("  Write a POEM about the sea. ") == normalise("write a poem, about the sea") == \
        "write a poem about the sea"


def test_shingles_and_jaccard_golden():
    a = shingles(words("a b c d e"), 3)  # {abc, bcd, cde}
    b = shingles(words("a b c d x"), 3)  # {abc, bcd, cdx}
    assert len(a) == len(b) == 3 and jaccard(a, b) == pytest.approx(2 / 4)
    assert shingles(words("one two"), 3) == shingles(words("One, two!"), 3) and len(shingles(["x", "y"], 3)) == 1
    assert shingles([], 3) == frozenset() and jaccard(frozenset(), frozenset()) == 1.0


def twenty_words(changed: int) -> str:
    base = [f"w{i}" for i in range(20)]
    for k in range(changed):
        base[19 - 7 * k] = f"changed{k}"
    return " ".join(base)


def test_near_duplicate_index_finds_copies_and_near_copies_only():
    index = NearDuplicateIndex(threshold=0.7)
    assert index.add("Write a poem about the sea.", "p0") is None
    assert index.add(twenty_words(0), "p1") is None
    assert index.find("write a POEM about the sea") == "p0"  # the same normalised text
    # One word changed at the end: 17 of the 18 3-gram shingles stay -> Jaccard 17/19 = 0.89 >= 0.7.
    one = twenty_words(1)
    j1 = jaccard(shingles(words(one), 3), shingles(words(twenty_words(0)), 3))
    assert j1 == pytest.approx(17 / 19) and index.find(one) == "p1"
    # Words 19, 12 and 5 changed: 1 + 3 + 3 of the 18 shingles differ -> Jaccard 11/25 = 0.44 < 0.7: not a duplicate.
    three = twenty_words(3)
    assert jaccard(shingles(words(three), 3), shingles(words(twenty_words(0)), 3)) == pytest.approx(11 / 25)
    assert index.find(three) is None
    assert index.find("Explain why the sky is blue.") is None
    assert index.add(one, "p2") == "p1" and len(index) == 2  # a duplicate is not stored


def test_near_duplicate_index_validates_its_settings():
    with pytest.raises(ValueError, match="bands=5 must divide num_perm=64"):
        NearDuplicateIndex(bands=5)
    with pytest.raises(ValueError, match="threshold=0"):
        NearDuplicateIndex(threshold=0)


@pytest.fixture(scope="module")
def heldout() -> HeldoutFilter:
    return HeldoutFilter([("gsm8k:1", GSM8K_1), ("mbpp:1", "Write a python function to remove first and last "
                                                "occurrence of a given character from the string."),
                          ("mbpp:69", "Write a function to multiply two integers."),
                          ("math:1", "What is 1+1?\n" + SUFFIX), ("math:2", "Compute 7 times 8.\n" + SUFFIX),
                          ("math:3", "Find the grid 0 0 1 0 1 1 0 1 0 0 1 1 1 0 1 here.\n" + SUFFIX)])


@pytest.mark.parametrize("text, match", [
    (GSM8K_1, "gsm8k:1"),  # verbatim
    (GSM8K_1.upper().replace(" ", "  "), "gsm8k:1"),  # case and spacing
    ("Here is a puzzle for you. " + GSM8K_1[:200] + " Solve it.", "gsm8k:1"),  # embedded: a shared 13-gram
    ("Write a Python function to remove the first and last occurrence of a given character from a string.",
     "mbpp:1"),  # reworded by articles: the keyword sets match
    ("Please write a function to multiply two integers and print the result.", "mbpp:69"),  # contains a short one
    (SUFFIX, None),  # template text of the suites is no evidence
    ("What is 2+2?\n" + SUFFIX, None),  # another question behind the same template
    ("Print the grid 0 0 1 0 1 1 0 1 0 0 1 1 1 0 1 please.", None),  # a run of numbers is no evidence
    ("Write a poem about the sea.", None),
])
def test_heldout_filter(heldout, text, match):
    assert heldout.match(text) == match


def test_heldout_filter_from_shipped_suites_reads_every_turn():
    f = HeldoutFilter.from_suites(["mt-bench"])
    assert f.size == 160  # 80 rows, two turns each
    assert f.match("Rewrite your previous response. Start every sentence with the letter A.") is not None
