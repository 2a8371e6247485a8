"""Data for the demo and for `lowrank finetune` (framework-free: no numpy, no torch).

Two things live here:

1. The demo's task, built from real human judgements that a package ships: the VADER sentiment
   lexicon (Hutto & Gilbert 2014, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis
   of Social Media Text", ICWSM), installed with `vaderSentiment` as `vader_lexicon.txt`. Each
   line holds a token, the mean of ten human ratings on a -4 (extremely negative) to +4
   (extremely positive) scale, their standard deviation, and the ten ratings. We keep the
   alphabetic entries (dropping emoticons such as ":-)"), keep those whose mean rating is at
   least 1 away from neutral, label them negative (mean < 0) or positive (mean > 0), and draw a
   seeded random train/test split; the 14 tokens listed twice (e.g. "lol") are left out.
   The task: read one English word, say whether people find it positive or negative.
   Nothing is generated; nothing is downloaded.

2. The JSONL reader for a user's own data. One JSON object per line, in one of three formats:

       {"text": "..."}                              causal language modelling on the text
       {"prompt": "...", "completion": "..."}       language modelling, loss on the completion
       {"text": "...", "label": "spam"}             classification (labels: all str or all int)

   The first non-blank line fixes the format; every error names the file, the line and the
   problem, so a bad row in a 10,000-line file is found at once. Bytes that are not UTF-8 text
   (a NUL, an invalid sequence) and JSON nested deeper than `MAX_JSON_DEPTH` are refused by
   line too (Python's json would recurse until RecursionError); `loads_json` is that guarded
   parser, which `lowrank estimate` uses for config.json as well.

Constant: `MAX_JSON_DEPTH` (100), the deepest nesting of arrays and objects a line may have.
"""

import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

__all__ = [
    "MAX_JSON_DEPTH",
    "ClassificationSplit",
    "JsonlDataset",
    "LexiconEntry",
    "json_kind",
    "load_vader_lexicon",
    "loads_json",
    "read_jsonl",
    "vader_lexicon_path",
    "vader_word_sentiment",
]

# ----------------------------------------------------------------------------- VADER lexicon


@dataclass(frozen=True)
class LexiconEntry:
    """One line of vader_lexicon.txt: a token and its ten human ratings in [-4, 4].

    Hutto & Gilbert 2014, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of
    Social Media Text" (ICWSM).

    Attributes:
        token: the word or emoticon rated.
        mean: mean of the ten ratings.
        std: their standard deviation.
        ratings: the ten raw ratings.

    Examples:
        >>> from lowrank.data import load_vader_lexicon
        >>> good = next(entry for entry in load_vader_lexicon() if entry.token == "good")
        >>> good
        LexiconEntry(token='good', mean=1.9, std=0.9434, ratings=(2, 1, 1, 3, 2, 4, 2, 2, 1, 1))
    """

    token: str
    mean: float
    std: float
    ratings: tuple[int, ...]


@dataclass(frozen=True)
class ClassificationSplit:
    """A labelled text classification task with a fixed train/test split.

    Attributes:
        train_texts: the training texts.
        train_labels: their class indices, one per text.
        test_texts: the test texts (none of them a training text).
        test_labels: their class indices.
        label_names: label_names[i] is the name of class i.
        description: where the data comes from and how it was built, in plain words.

    Examples:
        >>> from lowrank.data import vader_word_sentiment
        >>> split = vader_word_sentiment(n_train=10, n_test=5)
        >>> split.train_texts[:3], split.train_labels[:3], split.label_names
        (['attractor', 'pessimists', 'sux'], [1, 0, 0], ('negative', 'positive'))
        >>> print(split.description)
        VADER sentiment lexicon (Hutto & Gilbert 2014, shipped with vaderSentiment): 5576
        alphabetic words ... split of 10 train / 5 test words. Positive share: train 50.0%,
        test 20.0%.
    """

    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    label_names: tuple[str, ...]
    description: str


def vader_lexicon_path() -> Path:
    """The vader_lexicon.txt installed with the `vaderSentiment` package.

    Raises ImportError, saying what to install, when vaderSentiment is missing.

    Examples:
        >>> from lowrank.data import vader_lexicon_path
        >>> vader_lexicon_path().name
        'vader_lexicon.txt'
    """
    spec = find_spec("vaderSentiment")
    if spec is None or spec.origin is None:
        raise ImportError("the demo's data needs `vaderSentiment`: pip install vaderSentiment")
    return Path(spec.origin).parent / "vader_lexicon.txt"


def load_vader_lexicon(path: str | os.PathLike | None = None) -> list[LexiconEntry]:
    """Parse the tab-separated VADER lexicon (default: the copy shipped with vaderSentiment).

    Hutto & Gilbert 2014 (ICWSM). A line that is not token, mean, std and ten ratings raises
    ValueError naming the file and line.

    Examples:
        >>> from lowrank.data import load_vader_lexicon
        >>> lexicon = load_vader_lexicon()
        >>> len(lexicon), lexicon[0].token in {entry.token for entry in lexicon[1:]}
        (7520, False)
    """
    path = Path(path) if path is not None else vader_lexicon_path()
    entries = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 4:
                raise ValueError(
                    f"{path}:{line_number}: expected 4 tab-separated fields "
                    f"(token, mean, std, ratings), found {len(fields)}"
                )
            token, mean, std, ratings = fields
            try:
                entries.append(
                    LexiconEntry(token, float(mean), float(std), tuple(json.loads(ratings)))
                )
            except (ValueError, TypeError) as error:
                raise ValueError(f"{path}:{line_number}: cannot parse {line.strip()!r}") from error
    return entries


_WORD = re.compile(r"[a-z][a-z'-]*")  # a lower-case English word; emoticons like ":-)" fail


def vader_word_sentiment(
    *,
    n_train: int = 2000,
    n_test: int = 1000,
    min_abs_mean: float = 1.0,
    seed: int = 0,
    lexicon_path: str | os.PathLike | None = None,
) -> ClassificationSplit:
    """The demo task: is this single English word rated positive or negative by people?

    Words with |mean rating| >= `min_abs_mean` (5,576 of the lexicon's 7,520 entries at
    1.0, about 44% positive; tokens listed twice are dropped) are shuffled with `seed`; the
    first `n_train` are the training set and the next `n_test` the test set
    (disjoint). Label 0 = negative, 1 = positive.

    Examples:
        >>> from lowrank.data import vader_word_sentiment
        >>> split = vader_word_sentiment()
        >>> len(split.train_texts), len(split.test_texts), split.label_names
        (2000, 1000, ('negative', 'positive'))
        >>> bool(set(split.train_texts) & set(split.test_texts))  # disjoint
        False
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be positive, got {n_train} and {n_test}")
    lexicon = load_vader_lexicon(lexicon_path)
    token_counts = Counter(entry.token for entry in lexicon)  # a few tokens ("lol") appear twice
    words = [
        (entry.token, int(entry.mean > 0))
        for entry in lexicon
        if _WORD.fullmatch(entry.token)
        and abs(entry.mean) >= min_abs_mean
        and token_counts[entry.token] == 1
    ]
    if n_train + n_test > len(words):
        raise ValueError(
            f"asked for {n_train} + {n_test} words but only {len(words)} words have "
            f"|mean rating| >= {min_abs_mean}"
        )
    random.Random(seed).shuffle(words)
    train, test = words[:n_train], words[n_train : n_train + n_test]
    description = (
        f"VADER sentiment lexicon (Hutto & Gilbert 2014, shipped with vaderSentiment): "
        f"{len(words)} alphabetic words whose mean human rating (ten raters, -4..+4) is at least "
        f"{min_abs_mean} from neutral, labelled negative (mean < 0) or positive (mean > 0); "
        f"seeded ({seed}) random disjoint split of {n_train} train / {n_test} test words. "
        f"Positive share: train {sum(y for _, y in train) / n_train:.1%}, "
        f"test {sum(y for _, y in test) / n_test:.1%}."
    )
    return ClassificationSplit(
        train_texts=[w for w, _ in train],
        train_labels=[y for _, y in train],
        test_texts=[w for w, _ in test],
        test_labels=[y for _, y in test],
        label_names=("negative", "positive"),
        description=description,
    )


# ----------------------------------------------------------------------------- user JSONL

_FORMATS = {  # the exact set of keys each line may have -> the format's name
    frozenset({"text"}): "text",
    frozenset({"prompt", "completion"}): "prompt_completion",
    frozenset({"text", "label"}): "classification",
}


@dataclass(frozen=True)
class JsonlDataset:
    """The rows of a JSONL file in one format (what `read_jsonl` returns).

    Attributes:
        format: "text", "prompt_completion" or "classification".
        rows: the JSON objects, in file order (blank lines skipped).
        label_names: for classification, the distinct labels sorted; class i is label_names[i].
        path: the file the rows came from.
        line_numbers: the line of each row (`where(i)` says "file:line" of row i).

    Examples:
        >>> from lowrank.data import JsonlDataset
        >>> data = JsonlDataset(format="classification",
        ...                     rows=[{"text": "win cash", "label": "spam"},
        ...                           {"text": "see you at 6", "label": "ham"}],
        ...                     label_names=("ham", "spam"), path="mail.jsonl", line_numbers=(1, 3))
        >>> data.label_ids(), data.where(1)
        ([1, 0], 'mail.jsonl:3')
    """

    format: str
    rows: list[dict]
    label_names: tuple = ()
    path: str = ""
    line_numbers: tuple[int, ...] = ()

    def where(self, i: int) -> str:
        """ "file:line" of row i, for error messages about it."""
        line = self.line_numbers[i] if i < len(self.line_numbers) else f"row {i + 1}"
        return f"{self.path}:{line}"

    def label_ids(self) -> list[int]:
        """Each row's class index (classification only)."""
        index = {name: i for i, name in enumerate(self.label_names)}
        return [index[row["label"]] for row in self.rows]


def read_jsonl(path: str | os.PathLike) -> JsonlDataset:
    """Read and check a JSONL training file; errors say `file:line: problem`.

    Missing file: FileNotFoundError; a folder: IsADirectoryError; anything wrong inside the file
    (not UTF-8, NUL bytes, invalid or too deeply nested JSON, a line that is not an object of
    one of the three formats, mixed label types, no data): ValueError.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from lowrank.data import read_jsonl
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "mail.jsonl"
        ...     _ = path.write_text('{"text": "win cash", "label": "spam"}\\n\\n'
        ...                         '{"text": "see you at 6", "label": "ham"}\\n')
        ...     data = read_jsonl(path)
        >>> data.format, data.label_names, data.label_ids(), data.line_numbers
        ('classification', ('ham', 'spam'), [1, 0], (1, 3))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "mail.jsonl"
        ...     _ = path.write_text('{"text": "fine"}\\n{"text": "oops",}\\n')
        ...     read_jsonl(path)
        Traceback (most recent call last):
            ...
        ValueError: ...mail.jsonl:2: not valid JSON (Expecting property name enclosed in double
        quotes at column 17)
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    rows: list[dict] = []
    line_numbers: list[int] = []
    data_format = None
    label_type = None
    with open(path, "rb") as f:  # bytes: a bad byte is reported with its line
        for line_number, raw in enumerate(f, start=1):
            where = f"{path}:{line_number}"
            line = _decode_line(raw, where, first=line_number == 1)
            if not line.strip():
                continue
            row = loads_json(line.rstrip("\r\n"), where)  # columns count in the line
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {json_kind(row)}")
            row_format = _FORMATS.get(frozenset(row))
            if row_format is None:
                raise ValueError(
                    f"{where}: keys {sorted(row)} match no format; use exactly "
                    '{"text"}, {"prompt", "completion"} or {"text", "label"}'
                )
            if data_format is None:
                data_format = row_format
            elif row_format != data_format:
                raise ValueError(
                    f"{where}: this line is {row_format} but earlier lines are {data_format}; "
                    "one file holds one format"
                )
            for key in ("text", "prompt", "completion"):
                if key in row:
                    _check_string(row[key], key, where)
            if "text" in row and not row["text"].strip():
                raise ValueError(f"{where}: 'text' is empty")
            if "completion" in row and not row["completion"].strip():
                raise ValueError(f"{where}: 'completion' is empty")
            if "label" in row:
                label = row["label"]
                if isinstance(label, bool) or not isinstance(label, (str, int)):
                    raise ValueError(
                        f"{where}: 'label' must be a string or an integer, got {label!r}"
                    )
                if isinstance(label, str):
                    _check_string(label, "label", where)
                if label_type is None:
                    label_type = type(label)
                elif type(label) is not label_type:
                    kinds = {str: ("a string", "strings"), int: ("an integer", "integers")}
                    raise ValueError(
                        f"{where}: label {label!r} is {kinds[type(label)][0]} but earlier labels "
                        f"are {kinds[label_type][1]}; use one type for all labels"
                    )
            rows.append(row)
            line_numbers.append(line_number)
    if not rows:
        raise ValueError(f"{path}: the file has no data lines")
    label_names = ()
    if data_format == "classification":
        label_names = tuple(sorted({row["label"] for row in rows}))
        if len(label_names) < 2:
            raise ValueError(
                f"{path}: classification needs at least 2 distinct labels, found {label_names}"
            )
    return JsonlDataset(
        format=data_format,
        rows=rows,
        label_names=label_names,
        path=str(path),
        line_numbers=tuple(line_numbers),
    )


MAX_JSON_DEPTH = 100  # arrays and objects nested deeper than this are refused before parsing

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')  # a string literal, escapes included
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def loads_json(text: str, where: str, *, max_depth: int = MAX_JSON_DEPTH) -> object:
    """`json.loads(text)`, with errors (ValueError) that start with `where` ("file:line").

    Nesting deeper than `max_depth` arrays/objects is refused before the parser sees it:
    Python's json recurses once per level and dies with RecursionError at about 1,000.

    Examples:
        >>> from lowrank.data import loads_json
        >>> loads_json('{"hidden_size": 768, "layers": [1, 2]}', "config.json")
        {'hidden_size': 768, 'layers': [1, 2]}
        >>> loads_json("[" * 101 + "]" * 101, "deep.json:1")
        Traceback (most recent call last):
            ...
        ValueError: deep.json:1: JSON nested more than 100 levels deep; refused
    """
    if text.count("[") + text.count("{") > max_depth:  # only then can it be too deep
        depth = 0
        for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub('""', text)):
            depth += 1 if bracket in "[{" else -1
            if depth > max_depth:
                raise ValueError(f"{where}: JSON nested more than {max_depth} levels deep; refused")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        place = f"column {error.colno}"
        if "\n" in text.rstrip("\n"):  # several lines (a config.json, not a JSONL line)
            place = f"line {error.lineno} {place}"
        raise ValueError(f"{where}: not valid JSON ({error.msg} at {place})") from None
    except RecursionError:  # unreachable below max_depth; kept as a guard
        raise ValueError(f"{where}: JSON nested too deeply to parse") from None


def _decode_line(raw: bytes, where: str, *, first: bool) -> str:
    """One line of a JSONL file as text: UTF-8 (a byte-order mark on line 1 is allowed)."""
    if b"\x00" in raw:
        raise ValueError(
            f"{where}: contains a NUL byte; JSONL must be UTF-8 text (a binary or UTF-16 file?)"
        )
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{where}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at position "
            f"{error.start + 1}); JSONL must be UTF-8 text"
        ) from None


def _check_string(value: object, key: str, where: str) -> None:
    """A JSON string field: a str that is valid Unicode (no unpaired surrogate escapes)."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{where}: {key!r} holds an unpaired surrogate escape (such as \\ud800)"
        ) from None


def json_kind(value: object) -> str:
    """What a parsed JSON value is, in JSON's words ("an array", "a string", ...).

    Examples:
        >>> from lowrank.data import json_kind
        >>> json_kind([1, 2]), json_kind(True), json_kind(2.5), json_kind(None)
        ('an array', 'a boolean', 'a number', 'null')
    """
    if isinstance(value, bool):
        return "a boolean"
    kinds = {dict: "an object", list: "an array", str: "a string", int: "a number"}
    return kinds.get(type(value), "a number" if isinstance(value, float) else "null")
