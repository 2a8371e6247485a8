"""lowrank.data: the VADER task against vaderSentiment's own lexicon; the JSONL reader's errors."""

import json

import pytest

from lowrank.data import MAX_JSON_DEPTH, loads_json, read_jsonl, vader_word_sentiment


def test_vader_labels_agree_with_vaders_own_lexicon():
    # Oracle: vaderSentiment's analyzer parses the same file its own way into {token: mean}.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    lexicon = SentimentIntensityAnalyzer().lexicon
    split = vader_word_sentiment(n_train=2000, n_test=1000, seed=0)
    assert len(split.train_texts) == 2000 and len(split.test_texts) == 1000
    assert not set(split.train_texts) & set(split.test_texts)  # disjoint
    for word, label in zip(
        split.train_texts + split.test_texts, split.train_labels + split.test_labels, strict=True
    ):
        assert abs(lexicon[word]) >= 1.0
        assert label == (lexicon[word] > 0)
        assert word.isascii() and word[0].isalpha()


def test_vader_split_is_seeded():
    a, b, c = (vader_word_sentiment(n_train=50, n_test=20, seed=s) for s in (1, 1, 2))
    assert a.train_texts == b.train_texts and a.test_texts == b.test_texts
    assert a.train_texts != c.train_texts


def test_vader_asks_for_too_many_words():
    with pytest.raises(ValueError, match="only"):
        vader_word_sentiment(n_train=6000, n_test=1000)


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_formats(tmp_path):
    text = read_jsonl(_write(tmp_path, ['{"text": "a b"}', "", '{"text": "c"}']))
    assert text.format == "text" and len(text.rows) == 2
    pc = read_jsonl(_write(tmp_path, [json.dumps({"prompt": "Q", "completion": "A"})]))
    assert pc.format == "prompt_completion"
    rows = [
        {"text": "x", "label": "spam"},
        {"text": "y", "label": "ham"},
        {"text": "z", "label": "spam"},
    ]
    cls = read_jsonl(_write(tmp_path, [json.dumps(r) for r in rows]))
    assert cls.label_names == ("ham", "spam") and cls.label_ids() == [1, 0, 1]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "ok"}', '{"text": "ok"'], r":2: not valid JSON"),
        (['{"text": "ok"}', '["text"]'], r":2: expected a JSON object"),
        (['{"text": "ok"}', '{"txt": "typo"}'], r":2: keys \['txt'\] match no format"),
        (
            ['{"text": "ok"}', '{"prompt": "p", "completion": "c"}'],
            r":2: this line is prompt_completion",
        ),
        (['{"text": "ok"}', '{"text": 3}'], r":2: 'text' must be a string"),
        (['{"text": "ok"}', '{"text": "  "}'], r":2: 'text' is empty"),
        (
            ['{"text": "a", "label": 1}', '{"text": "b", "label": "x"}'],
            r":2: label 'x' is a string but earlier labels are integers",
        ),
        (['{"text": "a", "label": 1}', '{"text": "b", "label": true}'], r":2: 'label' must be"),
        (['{"text": "a", "label": 1}', '{"text": "b", "label": 1}'], r"at least 2 distinct labels"),
        (["", "  "], r"no data lines"),
    ],
)
def test_jsonl_errors_name_line_and_problem(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message):
        read_jsonl(_write(tmp_path, lines))


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data file"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_jsonl_folder(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        read_jsonl(tmp_path)


def test_jsonl_rows_know_their_lines(tmp_path):
    data = read_jsonl(_write(tmp_path, ["", '{"text": "a"}', "  ", '{"text": "b"}']))
    assert data.line_numbers == (2, 4)
    assert data.where(1) == f"{tmp_path / 'data.jsonl'}:4"


@pytest.mark.parametrize(
    "content, message",
    [
        (
            b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
            r":2: not valid UTF-8 \(byte 0xe9 at position 14\)",
        ),
        (b'{"text": "ok"}\n{"text": "a\x00b"}\n', r":2: contains a NUL byte"),
        ('{"text": "ok"}\n'.encode("utf-16"), r":1: contains a NUL byte.*UTF-16"),
        (b"\x89PNG\r\n\x1a\n", r":1: not valid UTF-8"),
        (b'{"text": "a \\udc00"}\n', r":1: 'text' holds an unpaired surrogate"),
        (b'{"text": "a", "label": "\\ud800"}\n', r":1: 'label' holds an unpaired surrogate"),
        (b'{"text": "broken"\n', r":1: not valid JSON \(Expecting ',' delimiter at column 18\)"),
        (b"[" * 100_000 + b"]" * 100_000 + b"\n", r":1: JSON nested more than 100 levels"),
    ],
    ids=["latin-1", "nul", "utf-16", "png", "surrogate", "surrogate-label", "column", "deep"],
)
def test_jsonl_bytes_that_are_not_utf8_json(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_jsonl(path)


def test_jsonl_byte_order_mark_is_allowed(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes('{"text": "a"}\n{"text": "b"}\n'.encode("utf-8-sig"))
    assert read_jsonl(path).rows == [{"text": "a"}, {"text": "b"}]


def test_json_depth_limit():
    # Oracle: nesting built by hand; json itself parses both sides of the limit.
    at_limit = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert loads_json(at_limit, "x") == json.loads(at_limit)
    with pytest.raises(ValueError, match=r"^x: JSON nested more than 100 levels deep"):
        loads_json("[" + at_limit + "]", "x")
    # brackets inside strings (escaped quotes too) are text, not nesting
    text = json.dumps({"text": '\\"[' * 500 + "{" * 500})
    assert loads_json(text, "x") == json.loads(text)
    # many arrays side by side are not deep
    wide = "[" + ",".join(["[]"] * 1000) + "]"
    assert loads_json(wide, "x") == json.loads(wide)
