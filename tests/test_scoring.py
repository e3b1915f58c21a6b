"""Generation scores: known answers, parity with independent computations from the definitions, METEOR's needs."""

from __future__ import annotations

import json
import math
import random
import shutil
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import nltk
import pytest
from nltk.data import ZipFilePathPointer

import main as cli
from pipeline.scoring import METRIC_NAMES, corpus_scores, wordnet_found

# Made-up words: lowercase alphanumerics that every metric's tokenizer keeps whole, with no stems or synonyms.
VOCAB = [f"w{i:02d}" for i in range(30)]


needs_wordnet = pytest.mark.skipif(not wordnet_found(), reason="WordNet is not on NLTK's data path (set NLTK_DATA)")


def write_punkt_tab(nltk_data: Path) -> None:
    """An untrained punkt_tab model for English (empty parameter files): it splits sentences at every period that
    ends a word, which on the text here is what the trained model does too."""
    model = nltk_data / "tokenizers" / "punkt_tab" / "english"
    model.mkdir(parents=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (model / name).write_text("")


@pytest.fixture
def punkt_tab(tmp_path, monkeypatch) -> Path:
    """NLTK's data path with an untrained punkt_tab model after whatever it held (WordNet, when NLTK_DATA has it)."""
    write_punkt_tab(tmp_path / "punkt")
    monkeypatch.setattr(nltk.data, "path", [*nltk.data.path, str(tmp_path / "punkt")])
    return tmp_path / "punkt"


@pytest.fixture
def nothing_to_download(monkeypatch):
    monkeypatch.setattr(nltk, "download", lambda *args, **kwargs: False)  # as offline
    # nltk keeps the punkt model it loaded for the rest of the process; look it up afresh.
    nltk.tokenize._get_punkt_tokenizer.cache_clear()


def random_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Hypotheses sharing some words with their references, in and out of order, no word twice in a sentence."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        ref = rng.sample(VOCAB, rng.randint(5, 12))
        hyp = [w if rng.random() < 0.6 else rng.choice(VOCAB) for w in ref]
        if rng.random() < 0.5:
            i, j = sorted(rng.sample(range(len(hyp)), 2))
            hyp[i:j] = reversed(hyp[i:j])
        hyp = list(dict.fromkeys(hyp + rng.sample(VOCAB, rng.randint(0, 3))))
        pairs.append((" ".join(hyp), " ".join(ref)))
    return pairs


def shift_free_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Hypotheses that keep the reference's words they share in order, so no TER shift can help."""
    rng = random.Random(seed)
    ref_words, foreign = VOCAB[:20], VOCAB[20:]
    pairs = []
    for _ in range(n):
        ref = rng.sample(ref_words, rng.randint(5, 10))
        hyp = []
        for w in ref:
            r = rng.random()
            if r < 0.15:
                continue  # deletion
            hyp.append(rng.choice(foreign) if r < 0.35 else w)  # substitution or match
            if rng.random() < 0.1:
                hyp.append(rng.choice(foreign))  # insertion
        pairs.append((" ".join(hyp), " ".join(ref)))
    return pairs


def ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def reference_bleu(pairs, smoothing: str) -> float:
    """Papineni et al.'s corpus BLEU (4-grams, brevity penalty); 'exp' is sacrebleu's mteval smoothing."""
    matches, possible = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for hyp, ref in pairs:
        h, r = hyp.split(), ref.split()
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, 5):
            hn, rn = ngrams(h, n), ngrams(r, n)
            matches[n - 1] += sum(min(c, rn[g]) for g, c in hn.items())
            possible[n - 1] += sum(hn.values())
    precisions, halvings = [], 1
    for m, p in zip(matches, possible, strict=True):
        if m == 0 and smoothing == "exp":
            halvings *= 2
            precisions.append(1 / (halvings * p))
        else:
            precisions.append(m / p)
    if min(precisions) == 0:
        return 0.0
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(sum(math.log(p) for p in precisions) / 4)


def reference_chrf(pairs, max_order: int = 6, beta: float = 2) -> float:
    """Popovic's chrF: character n-gram precision and recall averaged over orders 1-6, then F-beta (x100)."""
    stats = [[0, 0, 0] for _ in range(max_order)]
    for hyp, ref in pairs:
        h, r = "".join(hyp.split()), "".join(ref.split())
        for n in range(1, max_order + 1):
            hn = Counter(h[i : i + n] for i in range(len(h) - n + 1))
            rn = Counter(r[i : i + n] for i in range(len(r) - n + 1))
            stats[n - 1][0] += sum(hn.values())
            stats[n - 1][1] += sum(rn.values())
            stats[n - 1][2] += sum(min(c, rn[g]) for g, c in hn.items())
    orders = [(m / h, m / r) for h, r, m in stats if h and r]
    p = sum(o[0] for o in orders) / len(orders)
    r = sum(o[1] for o in orders) / len(orders)
    return 100 * (1 + beta**2) * p * r / (beta**2 * p + r) if p + r else 0.0


def levenshtein(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def f1(overlap: int, hyp_count: int, ref_count: int) -> float:
    if overlap == 0:
        return 0.0
    p, r = overlap / hyp_count, overlap / ref_count
    return 2 * p * r / (p + r)


def lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def reference_rouge(pairs) -> dict[str, float]:
    """Lin's ROUGE-1/2 (n-gram overlap) and ROUGE-L (longest common subsequence) F1, averaged over pairs."""
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hyp, ref in pairs:
        h, r = hyp.split(), ref.split()
        for n, key in ((1, "rouge1"), (2, "rouge2")):
            hn, rn = ngrams(h, n), ngrams(r, n)
            totals[key] += f1(sum((hn & rn).values()), sum(hn.values()), sum(rn.values()))
        totals["rougeL"] += f1(lcs(h, r), len(h), len(r))
    return {k: v / len(pairs) for k, v in totals.items()}


def reference_meteor(pairs, alpha=0.9, beta=3, gamma=0.5) -> float:
    """Banerjee and Lavie's METEOR with exact case-insensitive matches (the words that differ here have no stems or
    synonyms in common), averaged. Words are separated by spaces. The k-th occurrence of a word in the hypothesis
    aligns with its k-th in the reference: the pairs here hold a repeated word as often on both sides, where that is
    the alignment without crossings."""
    scores = []
    for hyp, ref in pairs:
        h, r = hyp.lower().split(), ref.lower().split()
        positions, seen = defaultdict(list), Counter()
        for j, w in enumerate(r):
            positions[w].append(j)
        aligned = []
        for i, w in enumerate(h):
            if seen[w] < len(positions[w]):
                aligned.append((i, positions[w][seen[w]]))
            seen[w] += 1
        if not aligned:
            scores.append(0.0)
            continue
        m = len(aligned)
        p, rc = m / len(h), m / len(r)
        fmean = p * rc / (alpha * p + (1 - alpha) * rc)
        chunks = 1 + sum(1 for a, b in zip(aligned, aligned[1:], strict=False) if b != (a[0] + 1, a[1] + 1))
        scores.append(fmean * (1 - gamma * (chunks / m) ** beta))
    return sum(scores) / len(scores)


def score(pairs) -> dict:
    return corpus_scores([h for h, _ in pairs], [r for _, r in pairs])


def test_identical_text_scores_perfectly():
    s = score([("the castle was built in 1900 .", "the castle was built in 1900 ."), ("a b c d e", "a b c d e")])
    assert s["bleu"] == pytest.approx(1.0) and s["sacrebleu"] == pytest.approx(100.0)
    assert s["chrf"] == pytest.approx(100.0) and s["ter"] == 0.0
    assert s["rouge1"] == s["rouge2"] == s["rougeL"] == pytest.approx(1.0)


def test_text_with_nothing_in_common_scores_zero():
    s = score([("aaa bbb ccc ddd", "xxx yyy zzz qqq"), ("eee fff ggg hhh", "ttt uuu vvv www")])
    assert s["bleu"] == 0.0 and s["chrf"] == 0.0
    assert s["rouge1"] == s["rouge2"] == s["rougeL"] == 0.0
    assert s["ter"] == pytest.approx(100.0)  # every word substituted


def test_bleu_sacrebleu_chrf_rouge_match_independent_computations():
    pairs = random_pairs(40, seed=1)
    s = score(pairs)
    assert s["bleu"] == pytest.approx(reference_bleu(pairs, smoothing="none"), abs=1e-12)
    assert s["sacrebleu"] == pytest.approx(100 * reference_bleu(pairs, smoothing="exp"), abs=1e-10)
    assert s["chrf"] == pytest.approx(reference_chrf(pairs), abs=1e-10)
    for key, value in reference_rouge(pairs).items():
        assert s[key] == pytest.approx(value, abs=1e-12)
    assert 0 < s["bleu"] < 1 and s["sacrebleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")


def test_ter_matches_edit_distance_where_no_shift_helps_and_counts_a_shift_as_one_edit():
    pairs = shift_free_pairs(40, seed=2)
    edits = sum(levenshtein(h.split(), r.split()) for h, r in pairs)
    words = sum(len(r.split()) for _, r in pairs)
    assert score(pairs)["ter"] == pytest.approx(100 * edits / words, abs=1e-10)
    assert score([("c d a b", "a b c d")])["ter"] == pytest.approx(25.0)  # one block shift, 4 reference words
    assert score([("The Castle", "the castle")])["ter"] == 0.0  # case-insensitive, as evaluate's `ter`


def test_scores_are_corpus_level_not_means_of_sentences():
    pairs = random_pairs(10, seed=3)
    sentence_mean = sum(score([p])["chrf"] for p in pairs) / len(pairs)
    assert score(pairs)["chrf"] != pytest.approx(sentence_mean)


@needs_wordnet
def test_meteor_matches_an_independent_computation_with_wordnet(punkt_tab):
    pairs = random_pairs(40, seed=4)
    s = score(pairs)
    assert s["meteor_unavailable_reason"] is None
    assert s["meteor"] == pytest.approx(reference_meteor(pairs), abs=1e-12)
    synonyms = score([("a fast dog", "a quick dog")])["meteor"]
    assert synonyms > score([("a xq dog", "a quick dog")])["meteor"]  # WordNet synonyms count


@needs_wordnet
def test_meteor_finds_the_synonyms_nltks_own_wordnet_finds(punkt_tab):
    from nltk.corpus import wordnet
    from nltk.translate.meteor_score import single_meteor_score

    for hypothesis, reference in [
        ("the big car was fast", "a large automobile was quick"),
        ("a fast dog", "a quick dog"),
    ]:
        ours = score([(hypothesis, reference)])["meteor"]
        nltks = single_meteor_score(
            reference.split(), hypothesis.split(), wordnet=wordnet, alpha=0.9, beta=3, gamma=0.5
        )
        assert 0 < ours == nltks


# Hypotheses with ordinary punctuation, as GPT-2 writes; references spaced, as WikiText is; and the hypotheses as
# evaluate's tokenization sees them (punkt splits the sentences, so each sentence's final period is a word).
ORDINARY_PUNCTUATION = [
    ("He went home. Then he slept.", "He went home . Then he slept ."),
    ("The castle was built by the king. It was w01 in w07.", "The castle was built by the king . It was w02 ."),
    ("A small village, near the w05. The railway came w06!", "A small village , near the w03 . The railway came w04 !"),
]
SPACED_HYPOTHESES = [
    "He went home . Then he slept .",
    "The castle was built by the king . It was w01 in w07 .",
    "A small village , near the w05 . The railway came w06 !",
]


@needs_wordnet
def test_meteor_tokenizes_ordinary_punctuation_as_evaluate_does(punkt_tab):
    refs = [r for _, r in ORDINARY_PUNCTUATION]
    s = score(ORDINARY_PUNCTUATION)
    expected = reference_meteor(list(zip(SPACED_HYPOTHESES, refs, strict=True)))
    assert s["meteor"] == pytest.approx(expected, abs=1e-12)
    assert score(ORDINARY_PUNCTUATION[:1])["meteor"] == pytest.approx(1 - 0.5 * (1 / 8) ** 3)  # same 8 words, 1 chunk


@needs_wordnet
def test_wordnet_and_punkt_tab_are_found_as_unzipped_folders(tmp_path, monkeypatch, nothing_to_download):
    wordnet = nltk.data.find("corpora/wordnet/")
    if isinstance(wordnet, ZipFilePathPointer):
        zipfile.ZipFile(wordnet.zipfile.filename).extractall(tmp_path / "corpora")
    else:
        shutil.copytree(wordnet.path, tmp_path / "corpora" / "wordnet")
    write_punkt_tab(tmp_path)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    s = score(ORDINARY_PUNCTUATION)
    assert s["meteor_unavailable_reason"] is None and s["meteor"] > 0.5


def test_meteor_without_its_nltk_resources_is_null_naming_them(monkeypatch, tmp_path, nothing_to_download):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    s = score([("a b c d", "a b c d")])
    assert s["meteor"] is None
    assert "wordnet and punkt_tab" in s["meteor_unavailable_reason"] and "NLTK_DATA" in s["meteor_unavailable_reason"]
    assert s["bleu"] == pytest.approx(1.0)  # the other metrics are still there
    (tmp_path / "corpora" / "wordnet").mkdir(parents=True)
    (tmp_path / "corpora" / "wordnet" / "lexnames").write_text("")  # what an interrupted download leaves
    reason = score([("a b c d", "a b c d")])["meteor_unavailable_reason"]
    assert "wordnet and punkt_tab" in reason


def test_score_command_writes_the_same_keys_as_results_metrics(tmp_path, capsys):
    path = tmp_path / "gen.csv"
    path.write_text('prompt,reference,hypothesis\np,"the castle , built",the castle built\np,a b c d e,a b c d e\n')
    assert cli.main(["score", str(path)]) == 0
    written = json.loads((tmp_path / "gen.scores.json").read_text())
    assert set(METRIC_NAMES) <= written.keys()
    expected = score([("the castle built", "the castle , built"), ("a b c d e", "a b c d e")])
    assert written["bleu"] == pytest.approx(expected["bleu"])
    printed = capsys.readouterr().out
    assert all(name in printed for name in METRIC_NAMES)


@pytest.mark.parametrize(
    "content, message",
    [
        ("prompt,reference\np,r\n", "needs 'reference' and 'hypothesis' columns"),
        ("reference,hypothesis\n", "has no rows"),
        ("", "needs 'reference' and 'hypothesis' columns"),
        (None, "cannot read"),
    ],
)
def test_score_command_rejects_bad_files_with_one_line_and_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_text(content)
    assert cli.main(["score", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
