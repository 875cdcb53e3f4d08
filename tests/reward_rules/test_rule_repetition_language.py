"""repetition (fires on CJK, the open-r1 bug) and language_consistency."""

from __future__ import annotations

import pytest

from reward_rules.language import language_consistency, script_counts
from reward_rules.repetition import repetition, tokenize_for_repetition


def test_repetition_english() -> None:
    texts = ["the cat sat on the mat", "a b c a b c a b c a b c", "one two", ""]
    # 12 tokens -> 10 trigrams, 3 distinct: -1 * (1 - 3/10)
    assert repetition(texts) == pytest.approx([0.0, -0.7, 0.0, 0.0])
    assert repetition(texts, max_penalty=-0.5) == pytest.approx([0.0, -0.35, 0.0, 0.0])


def test_repetition_fires_on_chinese() -> None:
    # open-r1's whitespace n-grams see one "word" here and never penalise it.
    looping = "我爱你我爱你我爱你我爱你"  # 12 characters, 10 trigrams, 3 distinct
    fresh = "今天天气很好我们去公园散步吧"
    assert repetition([looping, fresh]) == pytest.approx([-0.7, 0.0])
    # mixed text with spaces still splits CJK into characters
    assert tokenize_for_repetition("我们 think 一下") == ["我", "们", "think", "一", "下"]
    assert repetition(["答案是 答案是 答案是 答案是"], ngram_size=3)[0] < -0.5


def test_repetition_leaves_short_unbroken_answers_alone() -> None:
    # Split into characters, these scored −0.23, −0.33 and −0.58 with n = 3 (e.g. `\boxed{1000000}`:
    # 13 character trigrams, "000" four times, 10 distinct: −(1 − 10/13)); open-r1 gives 0, so does align.
    answers = ["\\boxed{1000000}", "<answer>100000</answer>", "2+2+2+2+2+2=12"]
    assert [tokenize_for_repetition(a) for a in answers] == [[a.lower()] for a in answers]
    assert repetition(answers, ngram_size=3) == [0.0, 0.0, 0.0]


def test_repetition_splits_long_unbroken_text_into_characters() -> None:
    looping = "ab" * 60  # 120 characters ≥ 100: 118 trigrams, 2 distinct ("aba", "bab")
    assert tokenize_for_repetition(looping) == list(looping)
    assert repetition([looping]) == pytest.approx([-(1 - 2 / 118)])
    # The length is a parameter: 8 characters ≥ 8 → 7 bigrams, 2 distinct.
    assert repetition(["abababab"], ngram_size=2, char_fallback_length=8) == pytest.approx([-(1 - 2 / 7)])
    assert repetition(["abababab"], ngram_size=2) == [0.0]  # one word


def test_repetition_validates_parameters() -> None:
    with pytest.raises(ValueError, match="max_penalty"):
        repetition(["a b c"], max_penalty=0.5)
    with pytest.raises(ValueError, match="ngram_size"):
        repetition(["a b c"], ngram_size=0)
    with pytest.raises(ValueError, match="char_fallback_length"):
        repetition(["a b c"], char_fallback_length=0)


def test_script_counts_words_and_characters() -> None:
    assert script_counts("Let me think 我们来看 Привет мир 12+3=15") == {"LATIN": 3, "CJK": 4, "CYRILLIC": 2}
    assert script_counts("ＡＢＣ") == {"LATIN": 1}  # fullwidth Latin is Latin


def test_language_consistency_share_of_target_script() -> None:
    mixed = "<think>Let me think 我们来看</think><answer>5</answer>"  # 3 Latin words, 4 Han characters
    assert language_consistency([mixed], language="en") == [pytest.approx(3 / 7)]
    assert language_consistency([mixed], language="zh") == [pytest.approx(4 / 7)]
    assert language_consistency(["<think>Считаем: два плюс три</think>"], language="ru") == [1.0]
    assert language_consistency(["<think>Считаем: два плюс три</think>"], language="en") == [0.0]
    assert language_consistency(["これは漢字とかなです"], language="ja") == [1.0]


def test_language_consistency_only_judges_the_think_block() -> None:
    text = "<think>all english here</think><answer>答案是五</answer>"
    assert language_consistency([text], language="en") == [1.0]
    # a pre-filled <think>: the chain of thought is the text before </think>
    assert language_consistency(["all english</think><answer>答案</answer>"], language="en") == [1.0]
    # no think block at all: the whole completion
    assert language_consistency(["english 中文"], language="en") == [pytest.approx(1 / 3)]


def test_language_consistency_no_letters_is_none_and_unknown_language_raises() -> None:
    assert language_consistency(["<think>1 + 2 = 3</think>"], language="en") == [None]
    with pytest.raises(ValueError, match="unknown language"):
        language_consistency(["x"], language="klingon")
