"""Prompt tokenizers: byte-level BPE (HF `tokenizers`) with fixed-length, masked batches.

Two ways to get one:
- `build_template_tokenizer()`: trained only on text generated from megamed's own prompt
  templates (`megamed.text.prompts`), deterministically, so its vocabulary carries no
  third-party text and can ship with a pretrained model.
- `train_report_tokenizer()`: trained on real radiology text (IU reports, CC BY-NC-ND 4.0, and
  prompts from CheXpert label rows). Derived from licensed data, so it lives in the user's
  cache and is never written into a git checkout.

Byte-level means any text encodes (no unknown token) and decode(encode(t)) == t.
Every sequence is [BOS] tokens... [EOS] [PAD]...; over-long text is cut but keeps its EOS.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import torch

from megamed import flags
from megamed.text.prompts import _TEMPLATE, FINDINGS, SEVERITY_THRESHOLDS, SIDES, VIEWS, prompt_from_labels

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2 in every megamed tokenizer
REPORTS_SUBDIR = Path("tokenizers") / "reports-bpe"


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("megamed tokenizers need the `tokenizers` package: pip install tokenizers") from e
    return tokenizers


class PromptTokenizer:
    """Wraps a trained `tokenizers.Tokenizer` whose vocabulary starts with <pad>, <bos>, <eos>."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if None in ids:
            missing = [t for t, i in zip(SPECIAL_TOKENS, ids) if i is None]
            raise ValueError(f"tokenizer: missing special token(s) {missing}; train it with megamed.text.tokenizer")
        self.pad_id, self.bos_id, self.eos_id = ids

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids LongTensor [B, L], mask BoolTensor [B, L] (True = real token incl. BOS/EOS), L = max_length."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts: expected a list of str (wrap a single prompt in a list)")
        if max_length < 2:
            raise ValueError(f"max_length: must be >= 2 to hold BOS and EOS, got {max_length}")
        # one by one, not encode_batch: prompts are short, and the batch path starts a thread pool
        # that makes forked DataLoader workers warn (and disable it) after the first use
        batch = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)   # [B, L]
        mask = torch.zeros((len(texts), max_length), dtype=torch.bool)             # [B, L]
        for b, enc in enumerate(batch):
            body = enc.ids[: max_length - 2]               # truncate the text, never the EOS
            seq = [self.bos_id, *body, self.eos_id]
            ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[b, : len(seq)] = True
        return ids, mask

    def decode(self, ids) -> str:
        """Text of one sequence (1-D ids, list or tensor): stops at the first EOS, drops BOS/PAD."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids: expected one 1-D sequence, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i not in (self.bos_id, self.pad_id):
                if not 0 <= i < self.vocab_size:
                    raise ValueError(f"ids: token id {i} is outside the vocabulary (size {self.vocab_size})")
                out.append(int(i))
        return self.tokenizer.decode(out)

    def save(self, directory: str | Path) -> Path:
        """Write DIR/tokenizer.json (created if needed); returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "tokenizer.json"
        tmp = path.with_name(path.name + ".tmp")
        self.tokenizer.save(str(tmp))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "PromptTokenizer":
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer here (save one with PromptTokenizer.save)")
        try:
            tok = _tokenizers().Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path}: not a valid tokenizers file: {e}") from e
        return cls(tok)


def train_bpe(texts, vocab_size: int) -> PromptTokenizer:
    """Byte-level BPE trained on an iterable of str. Deterministic for a given text sequence."""
    tk = _tokenizers()
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size: must be >= {256 + len(SPECIAL_TOKENS)} (bytes + specials), got {vocab_size}")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False, min_frequency=2,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())   # all 256 bytes: nothing is unknown
    tok.train_from_iterator(texts, trainer)
    return PromptTokenizer(tok)


def template_corpus() -> list[str]:
    """Every prompt shape our templates make: all views x label sets of up to 3 findings, and
    every finding with every severity word and side (singly and next to each other finding)."""
    views = (None, *VIEWS)
    severities = (None, 0.0, SEVERITY_THRESHOLDS[0], SEVERITY_THRESHOLDS[1])  # none / each word bin
    texts = []
    for view in views:
        for k in range(4):
            for combo in itertools.combinations(FINDINGS, k):
                texts.append(prompt_from_labels(dict.fromkeys(combo, 1.0), view=view))
        for name in FINDINGS:
            sides = (None, *SIDES) if _TEMPLATE[name][1] else (None,)
            for sev, side in itertools.product(severities, sides):
                detail = {name: {"severity": sev, "side": side}}
                texts.append(prompt_from_labels({name: 1.0}, detail, view=view, detail=True))
                for other in FINDINGS:
                    if other != name:
                        texts.append(prompt_from_labels({name: 1.0, other: 1.0}, detail, view=view, detail=True))
    return texts


def build_template_tokenizer(vocab_size: int = 1024) -> PromptTokenizer:
    """Byte-level BPE over `template_corpus()` only: shippable, and identical on every build.
    The vocabulary may stop short of vocab_size when the templates run out of pairs to merge."""
    return train_bpe(template_corpus(), vocab_size)


def inside_git_checkout(path: str | Path) -> Path | None:
    """The checkout root if `path` (existing or not) lies inside a git working tree, else None."""
    p = Path(path).expanduser().resolve()
    for parent in (p, *p.parents):
        if (parent / ".git").exists():
            return parent
    return None


def report_corpus(progress: bool = True) -> list[str]:
    """IU report text (FINDINGS + IMPRESSION, INDICATION) and our prompts for CheXpert frontal rows."""
    from megamed.text.labels import load_chexpert_labels
    from megamed.text.reports import load_iu_reports, report_text

    texts = []
    for r in load_iu_reports(progress=progress):
        texts += [t for t in (report_text(r), r["indication"]) if t]
    for row in load_chexpert_labels(progress=progress):
        if row["Frontal/Lateral"] == "Frontal":
            view = row["AP/PA"] if row["AP/PA"] in ("AP", "PA") else None
            texts.append(prompt_from_labels(row, view=view))
    return texts


def train_report_tokenizer(vocab_size: int = 8192, out_dir: str | Path | None = None,
                           *, progress: bool = True) -> PromptTokenizer:
    """Byte-level BPE over real reports + CheXpert-label prompts, saved to
    `out_dir` (default `flags.cache_dir()/tokenizers/reports-bpe/`).

    License: derived from IU reports (CC BY-NC-ND 4.0) and CheXpert labels (Stanford research
    terms). It is for local non-commercial research use: it is never written inside a git
    checkout (ValueError), and must not be shipped with a model. BPE stops merging pairs seen
    fewer than twice, so the vocabulary can end below vocab_size (~5.6k of 8192 on this corpus).
    """
    out_dir = Path(out_dir) if out_dir is not None else flags.cache_dir() / REPORTS_SUBDIR
    repo = inside_git_checkout(out_dir)
    if repo is not None:
        raise ValueError(f"out_dir: {out_dir} is inside the git checkout {repo}; the report tokenizer is derived "
                         f"from CC BY-NC-ND / research-only data and must stay out of the repository "
                         f"(default: {flags.cache_dir() / REPORTS_SUBDIR})")
    tok = train_bpe(report_corpus(progress), vocab_size)
    tok.save(out_dir)
    return tok


class HFTokenizer:
    """A Hugging Face tokenizer from a LOCAL directory, behind PromptTokenizer's interface, for
    models whose text encoder is a Hugging Face model (text.kind="hf"): its ids must be the ones
    that encoder was trained with, so megamed's BPE cannot stand in for it."""

    def __init__(self, tokenizer):
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer: the Hugging Face tokenizer has no pad token")
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id

    @classmethod
    def load(cls, directory: str | Path) -> "HFTokenizer":
        try:
            import transformers
        except ImportError as e:
            raise ImportError("a Hugging Face tokenizer needs transformers: pip install 'megamed[hf]'") from e
        return cls(transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True))

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids LongTensor [B, max_length], mask BoolTensor [B, max_length]; True = real token)."""
        if isinstance(texts, str):
            texts = [texts]
        out = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                             return_tensors="pt")
        return out["input_ids"].long(), out["attention_mask"].bool()

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        self.tokenizer.save_pretrained(str(directory))
        return directory


def load_tokenizer_dir(directory: str | Path):
    """A saved tokenizer directory -> PromptTokenizer, or HFTokenizer when it holds a Hugging Face
    tokenizer (tokenizer_config.json, which save_pretrained writes and PromptTokenizer.save does not)."""
    directory = Path(directory)
    if (directory / "tokenizer_config.json").exists():
        return HFTokenizer.load(directory)
    return PromptTokenizer.load(directory)
