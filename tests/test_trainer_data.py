"""Data preparation of the trainer: corpus readers, tokenizer, domain shards, Algorithm 1 sampling,
the meta-distribution π, and the cached `prepare` pipeline — all on a tiny corpus built in tmp_path."""
from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soe_sdk.errors import SoeError
from trainer.corpus import corpus_files, iter_documents
from trainer.sampling import (group_mixture, meta_distribution, neighbourhoods, sample_batch, sample_batch_with_domains,
                              usable_domains)
from trainer.shards import DomainShards, token_dtype, write_domain_shards, write_token_file
from trainer.tokenizer import EOT, EOT_ID, load_tokenizer, train_tokenizer

# ------------------------------------------------------------------ a tiny three-topic corpus

ENGLISH = [
    "The river rose quickly after three days of rain, and the farmers moved their cattle to the hills "
    "before the water reached the lower fields.",
    "She opened the old wooden box and found a bundle of letters, tied with a faded ribbon, that her "
    "grandmother had written during the long winter of the war.",
    "Most gardeners agree that tomatoes need plenty of sun, regular watering, and a sturdy stake to keep "
    "the heavy fruit off the ground.",
    "The museum will close early on Friday so that the staff can install the new exhibition of maps and "
    "navigation instruments from the eighteenth century.",
    "A good night's sleep improves memory, mood and concentration; doctors recommend going to bed at the "
    "same time every evening.",
    "The train to the coast was delayed by forty minutes, so the passengers bought coffee and watched the "
    "gulls circling above the station roof.",
    "In the spring the village holds a market where bakers, potters and beekeepers sell their goods in "
    "the square in front of the church.",
    "He learned to play the violin as a child, gave it up as a teenager, and picked it up again at sixty "
    "with more patience than before.",
    "The committee will publish its report next month, after reviewing the comments it received from "
    "residents during the public consultation.",
    "Snow covered the mountain pass overnight, and the road remained closed until the ploughs cleared a "
    "single lane late in the afternoon.",
    "Reading aloud to young children helps them learn new words and enjoy stories long before they can "
    "read on their own.",
    "The lighthouse keeper wrote down the weather every morning in a thick notebook that is now kept in "
    "the town library.",
]

CODE = [
    "def mean(values):\n    \"\"\"Return the arithmetic mean of a non-empty list.\"\"\"\n    total = sum(values)\n"
    "    return total / len(values)\n",
    "for (int i = 0; i < n; i++) {\n    if (buf[i] == '\\n') {\n        lines++;\n    }\n}\nreturn lines;\n",
    "import os\n\nfor root, dirs, files in os.walk('.'):\n    for name in files:\n        if name.endswith('.py'):\n"
    "            print(os.path.join(root, name))\n",
    "SELECT name, COUNT(*) AS orders\nFROM customers JOIN orders ON orders.customer_id = customers.id\n"
    "GROUP BY name\nORDER BY orders DESC\nLIMIT 10;\n",
    "func Max(a, b int) int {\n\tif a > b {\n\t\treturn a\n\t}\n\treturn b\n}\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n",
    "#!/bin/sh\nset -e\nfor f in *.log; do\n    gzip -9 \"$f\"\ndone\necho \"compressed $(ls *.gz | wc -l) files\"\n",
    "const fetchJson = async (url) => {\n  const response = await fetch(url);\n  if (!response.ok) throw new "
    "Error(response.statusText);\n  return response.json();\n};\n",
    "struct point { double x, y; };\n\ndouble dist(struct point a, struct point b) {\n    return sqrt((a.x - b.x) * "
    "(a.x - b.x) + (a.y - b.y) * (a.y - b.y));\n}\n",
    "with open(path, encoding='utf-8') as fh:\n    for lineno, line in enumerate(fh, start=1):\n        if "
    "line.startswith('#'):\n            continue\n        key, _, value = line.partition('=')\n",
    "git checkout -b feature/parser\ngit add src/parser.c tests/test_parser.c\ngit commit -m 'parser: handle "
    "empty input'\ngit push origin feature/parser\n",
    "if __name__ == '__main__':\n    import sys\n    sys.exit(main(sys.argv[1:]))\n",
]

FRENCH = [
    "Le petit village se trouve au bord d'un lac entouré de forêts, et les habitants y pêchent depuis des "
    "générations.",
    "La commande permet d'afficher la liste des fichiers d'un répertoire, triés par date de modification, "
    "du plus récent au plus ancien.",
    "Chaque matin, la boulangère ouvre sa boutique à six heures et prépare des croissants encore chauds "
    "pour les premiers clients.",
    "Les élèves ont visité le musée d'histoire naturelle et ont longuement observé le squelette de la "
    "baleine suspendu au plafond.",
    "Cette option indique au programme de ne pas suivre les liens symboliques lors du parcours récursif "
    "de l'arborescence.",
    "Le train de nuit traverse les Alpes avant l'aube ; les voyageurs se réveillent face aux sommets "
    "enneigés.",
    "Pour installer le paquet, exécutez la commande suivante en tant que superutilisateur, puis "
    "redémarrez le service.",
    "Au printemps, les cerisiers du jardin public fleurissent et attirent des promeneurs venus de toute "
    "la région.",
    "La bibliothèque municipale prête gratuitement des livres, des disques et des jeux de société à tous "
    "les habitants.",
    "En cas d'erreur, le programme renvoie un code de sortie non nul et écrit un message explicatif sur "
    "la sortie d'erreur standard.",
    "Ma grand-mère racontait que l'hiver de son enfance était si froid que la rivière gelait jusqu'au "
    "mois de mars.",
    "Le conseil municipal se réunira jeudi soir pour discuter du budget et du projet de nouvelle piste "
    "cyclable.",
]

ALL_TEXTS = ENGLISH + CODE + FRENCH


def _write_jsonl_gz(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"id": f"doc/{i}", "text": text}) + "\n")
    return path


def _interleaved(n_repeat: int = 1) -> list[str]:
    # topics interleaved like a shuffled corpus; repeated copies differ by a suffix so they are distinct
    out = []
    for r in range(n_repeat):
        for e, c, f in zip(ENGLISH, CODE, FRENCH):
            out += [e + ("" if r == 0 else f" ({r})"), c + ("" if r == 0 else f"# {r}\n"),
                    f + ("" if r == 0 else f" ({r})")]
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(_interleaved(2), 400)


# ------------------------------------------------------------------ corpus readers

def test_reads_every_supported_format_in_sorted_order(tmp_path):
    root = tmp_path / "corpus"
    _write_jsonl_gz(root / "b" / "part-1.jsonl.gz", ENGLISH[:3])
    (root / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in CODE[:2]) + "\n\n", encoding="utf-8")
    (root / "c").mkdir()
    (root / "c" / "note.txt").write_text(FRENCH[0], encoding="utf-8")
    table = pa.table({"text": FRENCH[1:6], "lang": ["fr"] * 5})
    pq.write_table(table, root / "d.parquet", row_group_size=2)  # three row groups
    (root / "README.md").write_text("not corpus text")
    (root / ".hidden.jsonl").write_text(json.dumps({"text": "never read"}) + "\n")

    names = [p.relative_to(root).as_posix() for p in corpus_files(root)]
    assert names == ["a.jsonl", "b/part-1.jsonl.gz", "c/note.txt", "d.parquet"]
    assert list(iter_documents(root)) == CODE[:2] + ENGLISH[:3] + FRENCH[:1] + FRENCH[1:6]
    assert list(iter_documents(root / "d.parquet")) == FRENCH[1:6]


def test_documents_are_streamed_not_loaded(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": ENGLISH[0]}) + "\n" + "{broken\n")
    docs = iter_documents(path)
    assert next(docs) == ENGLISH[0]  # the first document arrives before the bad line is read
    with pytest.raises(SoeError, match=r"x\.jsonl:2: not valid JSON"):
        next(docs)


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"id": 3}\n', r"bad\.jsonl:2: no 'text' field"),
    ('{"text": "ok"}\n{"text": 3}\n', r"bad\.jsonl:2: 'text' is not a string"),
    ('[1, 2]\n', r"bad\.jsonl:1: no 'text' field"),
    ('{"text": "ok"}\n\n{"text": "x\n', r"bad\.jsonl:3: not valid JSON"),
])
def test_bad_jsonl_lines_are_named(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(SoeError, match=message):
        list(iter_documents(path))


def test_bad_inputs_give_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("ignored")
    with pytest.raises(SoeError, match="no documents found"):
        list(iter_documents(tmp_path / "empty"))

    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(SoeError, match="no documents found"):
        list(iter_documents(blank))

    fake_gz = tmp_path / "fake.jsonl.gz"
    fake_gz.write_bytes(b"this is not gzip at all")
    with pytest.raises(SoeError, match=r"fake\.jsonl\.gz:1: not valid gzip"):
        list(iter_documents(fake_gz))

    other = tmp_path / "data.csv"
    other.write_text("text\nhello\n")
    with pytest.raises(SoeError, match=r"unsupported file type; supported: \.jsonl, \.jsonl\.gz, \.txt, \.parquet"):
        list(iter_documents(other))

    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "nocol.parquet")
    with pytest.raises(SoeError, match="no 'text' column"):
        list(iter_documents(tmp_path / "nocol.parquet"))

    with pytest.raises(SoeError, match="no such file or folder"):
        list(iter_documents(tmp_path / "missing"))


def test_error_messages_are_single_lines(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "fine"}\n') + b"garbage")
    with pytest.raises(SoeError) as exc_info:
        list(iter_documents(path))
    assert "\n" not in str(exc_info.value) and "bad.jsonl.gz" in str(exc_info.value)


# ------------------------------------------------------------------ tokenizer

ROUND_TRIP = ALL_TEXTS + ["", " ", "  two  spaces\tand\ttabs\r\nwindows line", "émoji 🎉 日本語 עברית",
                          "\x00\x01 control", f"literal {EOT} inside", "ﬁ ligature Å vs Å"]


def test_tokenizer_round_trips_any_text(tokenizer):
    assert tokenizer.token_to_id(EOT) == EOT_ID == 0
    assert 257 <= tokenizer.get_vocab_size() <= 400
    for text in ROUND_TRIP:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids) == text
    # a document that merely mentions the end-of-text marker is not cut in two
    assert EOT_ID not in tokenizer.encode(f"a {EOT} b").ids
    # merges were learned: common words take fewer tokens than bytes
    assert len(tokenizer.encode(ENGLISH[0]).ids) < 0.6 * len(ENGLISH[0].encode())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_tokenizer_round_trip_property(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_tokenizer_save_load(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    loaded = load_tokenizer(path)
    for text in ROUND_TRIP:
        assert loaded.encode(text).ids == tokenizer.encode(text).ids
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SoeError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(SoeError, match="vocab_size=100"):
        train_tokenizer(ALL_TEXTS, 100)


# ------------------------------------------------------------------ shards

def test_domain_shards_hold_each_domain_docs(tokenizer, tmp_path):
    texts = ALL_TEXTS
    assignments = [0] * len(ENGLISH) + [1] * len(CODE) + [3] * len(FRENCH)  # domain 2 stays empty
    index = write_domain_shards(tokenizer, iter(texts), assignments, 4, tmp_path, progress=False)
    shards = DomainShards.open(tmp_path)
    assert shards.k == 4 and shards.dtype == np.uint16 and index["dtype"] == "uint16"

    for d, group in [(0, ENGLISH), (1, CODE), (3, FRENCH)]:
        expected = np.concatenate([tokenizer.encode(t).ids + [EOT_ID] for t in group])
        assert shards.counts[d] == expected.size
        np.testing.assert_array_equal(np.asarray(shards.domain(d)), expected)
        assert tokenizer.decode(shards.domain(d).tolist()) == "".join(group)
    assert shards.counts[2] == 0 and shards.domain(2).size == 0
    assert shards.docs.tolist() == [len(ENGLISH), len(CODE), 0, len(FRENCH)]
    h = shards.h_generic
    assert h.dtype == np.float64 and h.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(h, shards.counts / shards.counts.sum())
    assert not (tmp_path / "domains.tmp").exists()


def test_shards_reject_mismatched_assignments(tokenizer, tmp_path):
    with pytest.raises(SoeError, match="corpus has 3 documents but 4 domain assignments"):
        write_domain_shards(tokenizer, iter(ENGLISH[:3]), [0, 1, 0, 1], 2, tmp_path, progress=False)
    assert not (tmp_path / "domains").exists()
    with pytest.raises(SoeError, match="no such file|not found"):
        DomainShards.open(tmp_path)


def test_token_file_and_dtype(tokenizer, tmp_path):
    n = write_token_file(tokenizer, iter(CODE), tmp_path / "code.bin")
    tokens = np.fromfile(tmp_path / "code.bin", dtype=np.uint16)
    assert n == tokens.size and (tokens == EOT_ID).sum() == len(CODE)
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


# ------------------------------------------------------------------ Algorithm 1 and π

def _synthetic_shards(root: Path, counts: list[int]) -> DomainShards:
    """Domains whose tokens are disjoint ranges (domain i holds 1000·i, 1000·i + 1, ...)."""
    dom = root / "domains"
    dom.mkdir(parents=True)
    for i, c in enumerate(counts):
        (1000 * i + np.arange(c)).astype(np.uint16).tofile(dom / f"{i:04d}.bin")
    (dom / "index.json").write_text(json.dumps({"k": len(counts), "dtype": "uint16", "vocab_size": 8000,
                                                "counts": counts, "docs": [1] * len(counts)}))
    return DomainShards.open(root)


def test_algorithm1_domain_frequencies_follow_h(tmp_path):
    shards = _synthetic_shards(tmp_path, [500, 300, 800, 400, 20])  # domain 4: too short for a window
    seq_len = 31
    h = np.array([0.1, 0.2, 0.3, 0.4, 0.0])
    rng = np.random.default_rng(123)
    rows, n_batches, batch = [], 200, 25
    for _ in range(n_batches):
        x, domains = sample_batch_with_domains(shards, h, batch, seq_len, rng)
        assert x.dtype == torch.long and x.shape == (batch, seq_len + 1)
        np.testing.assert_array_equal(x[:, 0].numpy() // 1000, domains)  # tokens prove the domain
        rows.append(x.numpy())
    x = np.concatenate(rows)
    # every row is a contiguous window inside one domain
    assert np.all(np.diff(x, axis=1) == 1)
    starts = x[:, 0] % 1000
    assert np.all(starts + seq_len < shards.counts[x[:, 0] // 1000])
    observed = np.bincount(x[:, 0] // 1000, minlength=5)
    expected = h * len(x)
    chi2 = float(((observed[:4] - expected[:4]) ** 2 / expected[:4]).sum())
    assert observed[4] == 0
    assert chi2 < 16.27  # χ²(3 dof) at p = 0.001
    # windows of domain 0 start anywhere in [0, 500 - 32]: both ends are reached over 5000 rows
    s0 = starts[x[:, 0] // 1000 == 0]
    assert s0.min() < 10 and s0.max() > 500 - 32 - 10


def test_unusable_domains_and_rng_checkpointing(tmp_path):
    shards = _synthetic_shards(tmp_path, [64, 65, 10])
    seq_len = 64
    np.testing.assert_array_equal(usable_domains(shards, seq_len), [False, True, False])
    # mass on unusable domains is moved to the usable ones
    x = sample_batch(shards, np.array([0.5, 0.25, 0.25]), 4, seq_len, np.random.default_rng(0))
    np.testing.assert_array_equal(x.numpy(), np.tile(1000 + np.arange(65), (4, 1)))
    with pytest.raises(SoeError, match="all mass is on domains with fewer than 65 tokens"):
        sample_batch(shards, np.array([0.5, 0.0, 0.5]), 4, seq_len, np.random.default_rng(0))
    with pytest.raises(SoeError, match="expected shape"):
        sample_batch(shards, np.array([1.0]), 4, seq_len, np.random.default_rng(0))

    # the generator state is plain data: restoring it replays the same batches
    big = _synthetic_shards(tmp_path / "big", [400, 400])
    rng = np.random.default_rng(7)
    sample_batch(big, np.array([0.5, 0.5]), 8, 16, rng)
    state = json.loads(json.dumps(rng.bit_generator.state))
    first = sample_batch(big, np.array([0.5, 0.5]), 8, 16, rng)
    rng2 = np.random.default_rng()
    rng2.bit_generator.state = state
    assert torch.equal(first, sample_batch(big, np.array([0.5, 0.5]), 8, 16, rng2))


def test_meta_distribution_draws_sparse_histograms():
    rng = np.random.default_rng(0)
    k, s = 16, 4
    usable = np.ones(k, dtype=bool)
    usable[[3, 9]] = False
    seen = np.zeros(k, dtype=int)
    for _ in range(500):
        h = meta_distribution(k, s, rng, usable=usable)
        assert h.shape == (k,) and h.dtype == np.float64
        assert np.count_nonzero(h) == s
        assert h.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(h >= 0)
        seen += h > 0
    assert seen[3] == seen[9] == 0
    assert np.all(seen[usable] > 0)
    # chosen domains are uniform: each usable domain is picked about s/14 of the time
    assert np.all(np.abs(seen[usable] / 500 - s / 14) < 0.1)
    h = meta_distribution(5, 5, rng)
    assert np.count_nonzero(h) == 5
    with pytest.raises(SoeError, match="support size s=3"):
        meta_distribution(4, 3, rng, usable=np.array([True, False, True, False]))


def test_meta_distribution_natural_choice_follows_domain_weights():
    rng = np.random.default_rng(1)
    k, s = 8, 2
    weights = np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0])
    seen = np.zeros(k, dtype=int)
    for _ in range(2000):
        h = meta_distribution(k, s, rng, domain_weights=weights)
        assert np.count_nonzero(h) == s and h.sum() == pytest.approx(1.0, abs=1e-12)
        seen += h > 0
    assert seen[6] == seen[7] == 0  # weightless domains are never drawn
    assert seen[0] > seen[1] > seen[2] > seen[4]  # the biggest domains are drawn most often
    assert seen[0] / 2000 > 0.7  # P(domain 0 among 2 of 6 draws ∝ weight) ≈ 0.8
    with pytest.raises(SoeError, match="only 1 usable domains have weight"):
        meta_distribution(4, 2, rng, domain_weights=np.array([1.0, 0.0, 0.0, 0.0]))


def test_neighbourhood_draws_stay_among_similar_domains():
    rng = np.random.default_rng(2)
    # two groups of four domains each, far apart: a neighbourhood of 4 never crosses groups
    base = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    centroids = np.repeat(base, 4, axis=0) + 0.01 * rng.standard_normal((8, 3))
    near = neighbourhoods(centroids, 4)
    assert near.shape == (8, 4) and np.all(near[:, 0] == np.arange(8))
    assert all(set(near[d]) == set(range(4 * (d // 4), 4 * (d // 4) + 4)) for d in range(8))
    anchors = np.zeros(8, dtype=int)
    for _ in range(400):
        h = meta_distribution(8, 3, rng, neighbours=near)
        chosen = np.flatnonzero(h)
        assert len(chosen) == 3 and h.sum() == pytest.approx(1.0, abs=1e-12)
        assert len({d // 4 for d in chosen}) == 1
        anchors[chosen] += 1
    assert np.all(anchors > 0)
    usable = np.ones(8, dtype=bool)
    usable[[1, 2]] = False  # domain 0's neighbourhood keeps only one usable neighbour
    with pytest.raises(SoeError, match="only 1 usable neighbours"):
        for _ in range(200):
            meta_distribution(8, 3, rng, usable=usable, neighbours=near)


def test_group_draws_come_from_whole_groups_in_the_corpus_proportions():
    rng = np.random.default_rng(3)
    groups = np.array([0, 0, 1, 1, 1, 2, 2, 3])
    weights = np.array([0.3, 0.1, 0.2, 0.1, 0.1, 0.1, 0.1, 0.0])  # group masses 0.4, 0.4, 0.2, 0
    usable = np.ones(8, dtype=bool)
    usable[4] = False
    picked = np.zeros(4, dtype=int)
    for _ in range(3000):
        h = group_mixture(groups, weights, 1, rng, usable=usable)
        assert h.sum() == pytest.approx(1.0, abs=1e-12) and h[4] == 0.0 and h[7] == 0.0
        (group,) = set(groups[h > 0])
        picked[group] += 1
        inside = np.where((groups == group) & usable, weights, 0.0)
        np.testing.assert_allclose(h, inside / inside.sum(), rtol=1e-12)  # the corpus's own proportions
    masses = np.array([0.4, 0.3, 0.2, 0.0]) / 0.9  # domain 4 is unusable: its mass is not drawn
    assert picked[3] == 0
    np.testing.assert_allclose(picked / 3000, masses, atol=0.03)
    h = group_mixture(groups, weights, 2, rng)
    mass = np.bincount(groups, weights=h, minlength=4)
    assert np.count_nonzero(mass) == 2 and mass.sum() == pytest.approx(1.0)
    with pytest.raises(SoeError, match="support size s=4"):
        group_mixture(groups, weights, 4, rng)


# ------------------------------------------------------------------ the prepare pipeline

def _file_state(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared workdir for the `tiny` preset: two corpus shards, a generic eval set, one specialist."""
    from trainer.prepare import prepare
    from trainer.presets import get_preset

    root = tmp_path_factory.mktemp("prep")
    docs = _interleaved(2)
    _write_jsonl_gz(root / "corpus" / "shard-0000.jsonl.gz", docs[:36])
    _write_jsonl_gz(root / "corpus" / "shard-0001.jsonl.gz", docs[36:])
    eval_path = _write_jsonl_gz(root / "generic_eval.jsonl.gz", [ENGLISH[0] + " Again.", CODE[1], FRENCH[2]])
    spec = root / "specialists" / "french"
    _write_jsonl_gz(spec / "train.jsonl.gz", FRENCH)  # the exact French documents of the corpus
    _write_jsonl_gz(spec / "eval.jsonl.gz", [FRENCH[3] + " Fin.", FRENCH[7] + " Fin."])
    preset = get_preset("tiny")
    kwargs = dict(eval_path=eval_path, specialist_dirs=[spec], progress=False)
    t0 = time.perf_counter()
    summary = prepare(root / "corpus", root / "work", preset, **kwargs)
    first_seconds = time.perf_counter() - t0
    return {"root": root, "work": root / "work", "summary": summary, "preset": preset, "kwargs": kwargs,
            "docs": docs, "first_seconds": first_seconds}


def test_prepare_writes_consistent_workdir(prepared):
    work, summary, docs = prepared["work"], prepared["summary"], prepared["docs"]
    k = 4
    for name in ["tokenizer.json", "embeddings.npy", "centroids.npy", "assignments.npy", "h_generic.npy",
                 "stages.json", "prepare.json", "domains/index.json", "eval/index.json", "eval/generic.bin",
                 "eval/french.bin", "eval/french.train.bin", "eval/french.h_hard.npy", "eval/french.h_soft.npy"]:
        assert (work / name).is_file(), name
    assert not list(work.rglob("*.tmp"))
    assert json.loads((work / "prepare.json").read_text()) == json.loads(json.dumps(summary))

    emb, cen, asg = (np.load(work / f) for f in ("embeddings.npy", "centroids.npy", "assignments.npy"))
    assert emb.shape == (len(docs), 384) and emb.dtype == np.float32
    assert cen.shape == (k, 384) and asg.shape == (len(docs),)
    assert summary["k"] == k and summary["n_docs"] == len(docs) == sum(summary["docs_per_domain"])

    tok = load_tokenizer(work / "tokenizer.json")
    shards = DomainShards.open(work)
    np.testing.assert_array_equal(shards.docs, np.bincount(asg, minlength=k))
    for d in range(k):  # each domain file = its documents' tokens, in corpus order
        expected = [t for i, doc in enumerate(docs) if asg[i] == d for t in tok.encode(doc).ids + [EOT_ID]]
        np.testing.assert_array_equal(np.asarray(shards.domain(d)), expected)
    h = np.load(work / "h_generic.npy")
    np.testing.assert_allclose(h, shards.h_generic)
    assert h.sum() == pytest.approx(1.0)

    generic = np.fromfile(work / "eval" / "generic.bin", dtype=np.uint16)
    assert summary["eval"]["generic"]["tokens"] == generic.size and (generic == EOT_ID).sum() == 3
    # Algorithm 3 on the specialist's train docs, which are exactly the corpus's French documents:
    # their histogram must match where those documents were assigned (up to one bf16 tie flip)
    h_hard, h_soft = (np.load(work / "eval" / f"french.h_{m}.npy") for m in ("hard", "soft"))
    french_ids = [docs.index(t) for t in FRENCH]
    expected_hard = np.bincount(asg[french_ids], minlength=k) / len(FRENCH)
    assert np.abs(h_hard - expected_hard).sum() <= 2 / len(FRENCH) + 1e-9
    assert h_soft.shape == (k,) and h_soft.sum() == pytest.approx(1.0) and np.all(h_soft > 0)
    top = summary["eval"]["french"]["top_domains_hard"]
    assert top[0][0] == int(np.argmax(h_hard))


def test_prepare_rerun_reuses_every_stage(prepared):
    from trainer.prepare import prepare

    work = prepared["work"]
    before_files = _file_state(work)
    before_stages = (work / "stages.json").read_text()
    summary = prepare(prepared["root"] / "corpus", work, prepared["preset"], **prepared["kwargs"])
    assert set(summary["timings"].values()) == {"cached"}
    assert (work / "stages.json").read_text() == before_stages
    after = _file_state(work)
    for name, state in before_files.items():
        if name not in ("prepare.json", "eval/index.json"):  # summaries are rewritten every run
            assert after[name] == state, name


def test_prepare_reruns_only_stages_whose_inputs_changed(prepared, tmp_path):
    import shutil

    from trainer.prepare import prepare

    work = tmp_path / "work"
    shutil.copytree(prepared["work"], work)
    preset = prepared["preset"].replace(clusters=(3, 1))
    summary = prepare(prepared["root"] / "corpus", work, preset, **prepared["kwargs"])
    t = summary["timings"]
    assert t["tokenizer"] == t["embeddings"] == t["eval:generic"] == "cached"
    assert all(isinstance(t[s], float) for s in ("clusters", "shards", "eval:french"))
    assert summary["k"] == 3 and DomainShards.open(work).k == 3
    assert np.load(work / "eval" / "french.h_hard.npy").shape == (3,)


def test_prepare_with_given_tokenizer_and_bad_inputs(prepared, tmp_path):
    from trainer.prepare import prepare

    root = prepared["root"]
    summary = prepare(root / "corpus", tmp_path / "w", prepared["preset"], max_docs=20, progress=False,
                      tokenizer_path=prepared["work"] / "tokenizer.json")
    assert summary["n_docs"] == 20 and summary["eval"] == {}
    assert load_tokenizer(tmp_path / "w" / "tokenizer.json").get_vocab() == \
        load_tokenizer(prepared["work"] / "tokenizer.json").get_vocab()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SoeError, match="no documents found"):
        prepare(tmp_path / "empty", tmp_path / "w2", prepared["preset"], progress=False)
    with pytest.raises(SoeError, match="no train file"):
        prepare(root / "corpus", tmp_path / "w", prepared["preset"], progress=False,
                specialist_dirs=[tmp_path / "empty"])
