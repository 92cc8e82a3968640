"""Built-in input domains (English prose, source code, random tokens, repeated tokens) for comparing a model's
behaviour across kinds of input, e.g. in `sinkscope report` and `find_dormant_heads`.

The texts are embedded here (written for sinkscope, no data set needed) so that every report is reproducible
offline. Each domain becomes a `TokenBatch` of ``samples`` sequences cut to ``n_tokens`` tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sinkscope.errors import InputError
from sinkscope.inputs import TokenBatch, apply_bos, random_inputs, single_token_id

PROSE: tuple[str, ...] = (
    "The river that runs through the old town was once the main road for merchants. Barges carried wool, salt "
    "and timber to the coast, and the warehouses along the quay still carry the names of the families who owned "
    "them. Today most of the buildings have become flats, cafes and a small museum about the trade.",
    "When the first frost arrives, the gardeners cover the young plants with straw and sacking. Roots survive "
    "the cold far better than leaves, so the aim is to keep the soil from freezing solid. In spring the covers "
    "come off, the beds are weeded and the first seeds go into the ground by the middle of March.",
    "The committee met on Tuesday to discuss the budget for the coming year. Several members argued that the "
    "library needed new computers, while others wanted to repair the roof before the winter storms. After a "
    "long debate they agreed to split the money and to ask the council for an additional grant.",
    "Honeybees communicate the location of food through a series of movements known as the waggle dance. The "
    "angle of the dance tells other workers the direction relative to the sun, and its duration signals the "
    "distance. Researchers have decoded these dances to map where colonies forage across a landscape.",
    "She had never seen the sea before she turned twenty. The bus came over the hill, and suddenly the whole "
    "horizon was grey and silver and moving. She remembered pressing her hand against the cold window and "
    "laughing, although nobody else on the bus seemed to notice anything unusual at all.",
    "The new bridge was designed to carry both trains and cars across the estuary. Engineers tested models of "
    "the structure in a wind tunnel for months, because the strong gusts from the sea could set up dangerous "
    "vibrations. The final design uses a steel deck hung from two tall concrete towers.",
    "In the eighteenth century, many villages had a single shop that sold everything from candles to cloth. "
    "The shopkeeper often acted as banker and postmaster as well, lending small sums to farmers until the "
    "harvest was sold. Account books from such shops are a rich source for historians of rural life.",
    "Volcanic soils are among the most fertile in the world, which is why people have farmed the slopes of "
    "active volcanoes for thousands of years. Ash weathers quickly into clay rich in minerals, and the steep "
    "terraces built by generations of farmers still produce grapes, olives and vegetables today.",
)

CODE: tuple[str, ...] = (
    "def moving_average(values, window):\n    if window <= 0:\n        raise ValueError('window must be positive')\n"
    "    total = sum(values[:window])\n    out = [total / window]\n    for i in range(window, len(values)):\n"
    "        total += values[i] - values[i - window]\n        out.append(total / window)\n    return out\n",
    "import json\nfrom pathlib import Path\n\n\ndef load_config(path):\n    data = json.loads(Path(path).read_text())\n"
    "    for key in ('name', 'version'):\n        if key not in data:\n            raise KeyError(f'missing {key}')\n"
    "    return data\n",
    "class Stack:\n    def __init__(self):\n        self._items = []\n\n    def push(self, item):\n"
    "        self._items.append(item)\n\n    def pop(self):\n        if not self._items:\n"
    "            raise IndexError('pop from empty stack')\n        return self._items.pop()\n",
    "#include <stdio.h>\n\nint main(int argc, char **argv) {\n    int count = 0;\n"
    "    for (int i = 1; i < argc; i++) {\n"
    "        if (argv[i][0] == '-') {\n            count++;\n        }\n    }\n    printf(\"%d options\\n\", count);\n"
    "    return 0;\n}\n",
    "function debounce(fn, delay) {\n  let timer = null;\n  return function (...args) {\n    clearTimeout(timer);\n"
    "    timer = setTimeout(() => fn.apply(this, args), delay);\n  };\n}\n\nexport default debounce;\n",
    "SELECT customers.name, COUNT(orders.id) AS n_orders\nFROM customers\nLEFT JOIN orders ON orders.customer_id = "
    "customers.id\nWHERE orders.created_at >= '2024-01-01'\nGROUP BY customers.name\nORDER BY n_orders DESC\n"
    "LIMIT 10;\n",
    "fn parse_line(line: &str) -> Option<(String, u32)> {\n    let mut parts = line.split(',');\n"
    "    let name = parts.next()?.trim().to_string();\n    let age = parts.next()?.trim().parse().ok()?;\n"
    "    Some((name, age))\n}\n",
    "for epoch in range(num_epochs):\n    model.train()\n    for batch in loader:\n        optimizer.zero_grad()\n"
    "        loss = criterion(model(batch['x']), batch['y'])\n        loss.backward()\n        optimizer.step()\n"
    "    print(f'epoch {epoch}: loss {loss.item():.4f}')\n",
)

#: Words repeated in the ``repeat`` domain (single tokens for most BPE tokenisers).
REPEAT_WORDS: tuple[str, ...] = ("poem", "company", "book", "the", "water", "music", "red", "one")

DOMAIN_NAMES: tuple[str, ...] = ("text", "code", "random", "repeat")


def _texts(tokenizer: Any, texts: tuple[str, ...], kind: str, n_tokens: int, samples: int, bos: str) -> TokenBatch:
    if samples > len(texts):
        raise InputError(f"the built-in {kind} domain has {len(texts)} samples, asked for {samples}")
    seqs, flags = [], []
    for t in texts[:samples]:
        ids, has = apply_bos(list(tokenizer(t, add_special_tokens=True)["input_ids"]), tokenizer, bos)
        seqs.append(ids[:n_tokens])
        flags.append(has)
    return TokenBatch(seqs, kind, bos, all(flags), {"source": f"sinkscope.domains ({kind})", "n_tokens": n_tokens})


def _repeats(tokenizer: Any, n_tokens: int, samples: int, bos: str) -> TokenBatch:
    seqs, flags, words = [], [], []
    for w in REPEAT_WORDS:
        if len(seqs) == samples:
            break
        try:
            tid = single_token_id(tokenizer, w)
        except InputError:
            continue
        base = list(tokenizer("", add_special_tokens=True)["input_ids"]) if bos != "never" else []
        ids, has = apply_bos(base + [tid] * n_tokens, tokenizer, bos)
        seqs.append(ids[:n_tokens])
        flags.append(has)
        words.append(w)
    if not seqs:
        raise InputError("none of the built-in repeat words is a single token for this tokenizer")
    return TokenBatch(seqs, "repeat", bos, all(flags), {"words": words, "n_tokens": n_tokens})


def domain_batch(tokenizer: Any, name: str, *, n_tokens: int = 64, samples: int = 8, bos: str = "auto",
                 seed: int = 0) -> TokenBatch:
    """A `TokenBatch` of the built-in domain ``name`` (``text``, ``code``, ``random`` or ``repeat``).

    Args:
        tokenizer: the model's tokenizer.
        name: the domain.
        n_tokens: tokens per sample (texts are cut to this length; shorter texts stay shorter).
        samples: number of sequences (at most 8 for ``text``, ``code`` and ``repeat``).
        bos: BOS policy (see `sinkscope.inputs`).
        seed: seed of the ``random`` domain.

    Raises:
        InputError: unknown domain, or more samples than the domain has.
    """
    if n_tokens < 2 or samples < 1:
        raise InputError(f"domains need at least 2 tokens and 1 sample, got {n_tokens} x {samples}")
    builders: dict[str, Callable[[], TokenBatch]] = {
        "text": lambda: _texts(tokenizer, PROSE, "text", n_tokens, samples, bos),
        "code": lambda: _texts(tokenizer, CODE, "code", n_tokens, samples, bos),
        "random": lambda: random_inputs(tokenizer, n_tokens, samples, bos=bos, seed=seed),
        "repeat": lambda: _repeats(tokenizer, n_tokens, samples, bos),
    }
    if name not in builders:
        raise InputError(f"unknown input domain {name!r}; choose from {', '.join(DOMAIN_NAMES)}")
    return builders[name]()
