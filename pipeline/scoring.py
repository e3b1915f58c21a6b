"""Corpus-level generation scores, defined as the Hugging Face `evaluate` metrics of the same names.

The `evaluate` scripts come from the Hub at run time, so the same definitions are computed here with
the libraries those scripts wrap: sacrebleu, rouge-score and nltk.
"""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path
from statistics import fmean

import nltk
from nltk.corpus import CorpusReader, LazyCorpusLoader
from nltk.corpus.reader.wordnet import WordNetCorpusReader
from nltk.tokenize import punkt_model_available, word_tokenize
from nltk.translate.meteor_score import single_meteor_score
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF, TER
from tabulate import tabulate

from utils import ToolError, atomic_write_json

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
METRIC_NAMES = ("bleu", "sacrebleu", *ROUGE_TYPES, "ter", "chrf", "meteor")


# The files nltk's WordNet reader opens (data.* on first use): a folder left by an interrupted download lacks some.
WORDNET_FILES = ("lexnames", *(f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")))


def wordnet_found() -> bool:
    try:  # the unzipped folder, else the folder inside wordnet.zip
        for name in WORDNET_FILES:
            nltk.data.find(f"corpora/wordnet/{name}")
        return True
    except LookupError:
        return False


# What METEOR needs, as NLTK's downloader names it, and how to tell it is there: WordNet for synonyms, and punkt_tab,
# the sentence splitter word_tokenize runs first (loaded the way word_tokenize loads it).
METEOR_RESOURCES = {"wordnet": wordnet_found, "punkt_tab": punkt_model_available}


def meteor_unavailable_reason() -> str | None:
    """None when METEOR's resources are usable (found on NLTK's data path, or each downloaded once), else why not."""
    missing = []
    for name, found in METEOR_RESOURCES.items():
        if found():
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            nltk.download(name, quiet=True, raise_on_error=False, print_error_to=io.StringIO())
        if not found():
            missing.append(name)
    if not missing:
        return None
    return f"NLTK's {' and '.join(missing)} could not be found on its data path (set NLTK_DATA) or downloaded"


class EnglishWordNet(WordNetCorpusReader):
    """nltk's WordNet reader without the map from OMW's WordNet to the loaded one, which nltk builds on every load
    (even when the two are the same) for multilingual lookups METEOR never makes: two of the three seconds a load
    takes, in every run that generates."""

    def map_wn(self, version: str = "wordnet") -> None:
        return None


# Found and loaded as nltk's own `nltk.corpus.wordnet` is, on first use; the same synsets.
WORDNET = LazyCorpusLoader(
    "wordnet", EnglishWordNet, LazyCorpusLoader("omw-2.0", CorpusReader, r".*/wn-data-.*\.tab", encoding="utf8")
)

# What a METEOR figure depends on, stored with it so that figures computed another way are never compared unawares.
METEOR_SIGNATURE = f"nltk {nltk.__version__}: word_tokenize (punkt_tab), single_meteor_score alpha 0.9 beta 3 gamma 0.5"


def meteor(hypotheses: list[str], references: list[str]) -> float:
    """`evaluate`'s meteor: the mean over pairs of nltk's single_meteor_score (alpha 0.9, beta 3, gamma 0.5) on
    words from nltk's word_tokenize, which splits sentences with punkt before splitting words."""
    pairs = zip(hypotheses, references, strict=True)
    return fmean(
        single_meteor_score(word_tokenize(r), word_tokenize(h), wordnet=WORDNET, alpha=0.9, beta=3, gamma=0.5)
        for h, r in pairs
    )


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict:
    """The six metrics over all pairs (one reference each), with sacrebleu's signature and METEOR's status."""
    if not hypotheses or len(hypotheses) != len(references):
        raise ValueError("need as many hypotheses as references, and at least one")
    refs = [references]
    sacrebleu = BLEU()
    scores: dict = {
        "bleu": BLEU(tokenize="13a", smooth_method="none").corpus_score(hypotheses, refs).score / 100,
        "sacrebleu": sacrebleu.corpus_score(hypotheses, refs).score,
        "sacrebleu_signature": sacrebleu.get_signature().format(),
    }
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES))
    pair_scores = [scorer.score(r, h) for h, r in zip(hypotheses, references, strict=True)]
    for kind in ROUGE_TYPES:
        scores[kind] = fmean(s[kind].fmeasure for s in pair_scores)
    scores["ter"] = TER(case_sensitive=False).corpus_score(hypotheses, refs).score
    scores["chrf"] = CHRF().corpus_score(hypotheses, refs).score
    reason = meteor_unavailable_reason()
    scores["meteor"] = None if reason else meteor(hypotheses, references)
    scores["meteor_unavailable_reason"] = reason
    scores["meteor_signature"] = None if reason else METEOR_SIGNATURE
    scores["num_examples"] = len(hypotheses)
    return scores


def score_csv(path: str) -> dict:
    """Score a CSV with `reference` and `hypothesis` columns; print the scores, write FILE.scores.json."""
    csv_path = Path(path)
    try:
        with csv_path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = set(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ToolError(f"cannot read {csv_path}: {e}") from e
    if not {"reference", "hypothesis"} <= columns:
        raise ToolError(f"{csv_path} needs 'reference' and 'hypothesis' columns, has {sorted(columns) or 'none'}")
    if not rows:
        raise ToolError(f"{csv_path} has no rows to score")
    scores = corpus_scores([r["hypothesis"] or "" for r in rows], [r["reference"] or "" for r in rows])
    atomic_write_json(csv_path.with_suffix(".scores.json"), scores)
    print(tabulate([(name, scores[name]) for name in METRIC_NAMES], tablefmt="simple", missingval="-"))
    if scores["meteor_unavailable_reason"]:
        print(f"METEOR not computed: {scores['meteor_unavailable_reason']}")
    return scores
