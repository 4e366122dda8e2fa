"""The curation section (`data.curation` in a pipeline config; `soaes curate --set ...` on its own): what
`curation.curate` removes from training corpora and SFT sets before they are tokenized."""

from __future__ import annotations

from pydantic import Field, model_validator

from megatron_soaes.config.base import StrictModel


class QualityRules(StrictModel):
    """Gopher/C4-style document filters adapted to Chinese (counted in characters, not words; a rule
    set to null is off). Applied to pre-training corpora; SFT sets get dedup and decontamination only."""

    min_chars: int | None = 20  # shorter documents carry no knowledge (Gopher: 50 words ~ 80 Chinese characters)
    max_chars: int | None = 200_000  # a 'document' longer than this is a concatenation gone wrong
    # symbols (Unicode S*: '#', '…' as in Gopher, emoji, box drawing) per non-space character
    max_symbol_ratio: float | None = 0.10
    max_digit_ratio: float | None = 0.30  # tables of numbers, phone lists, ids
    # Han characters and letters per non-space character: below it the text is markup, code or noise
    min_text_ratio: float | None = 0.50
    max_duplicate_line_fraction: float | None = 0.30  # lines repeating an earlier line of the document (Gopher 0.30)
    # characters inside repeated `duplicate_ngram` character n-grams (Gopher's duplicated n-gram fraction,
    # on characters since Chinese has no words): copy loops and spam. 20 characters (~8-10 words): a
    # statute repeating its subject or a clause (2% of demo law articles are above 0.5, 16% above 0.2) is not a loop
    max_duplicate_ngram_fraction: float | None = 0.50
    duplicate_ngram: int = Field(20, ge=2)  # n of those character n-grams


class CurationConfig(StrictModel):
    """Exact and near-duplicate removal, quality rules and decontamination, each counted per source."""

    enabled: bool = True  # false: the data is used as it is
    exact_dedup: bool = True  # the same text after normalisation (NFKC, case, whitespace) is kept once
    near_dedup: bool = True  # MinHash + LSH over character shingles (datasketch)
    # character n-grams of the normalised text (punctuation and spaces removed; Chinese has no word
    # boundaries): 5 characters are about two to three words -- sentence order changes few of them,
    # while two unrelated documents on one topic share few
    shingle: int = Field(5, ge=2)
    near_threshold: float = Field(0.7, gt=0.0, le=1.0)  # estimated Jaccard similarity that makes a near duplicate
    num_perm: int = Field(128, ge=16)  # MinHash permutations (the estimate's standard error ~ 1/sqrt(num_perm))
    quality: QualityRules = QualityRules()
    decontaminate: bool = True  # remove training documents that share a long span with an evaluation item
    # a training document sharing any n-gram this long (normalised characters) with an evaluation item is
    # removed: long enough that statutory boilerplate shared by articles of different laws (up to ~35
    # characters: 的董事监事高级管理人员执行公司职务时违反法律行政法规或者公司章程) does not match,
    # short enough for a copied sentence or quoted article
    decontam_ngram: int = Field(50, ge=8)
    # evaluation items shorter than decontam_ngram (short questions) are matched whole when at least this long
    decontam_min_item: int = Field(16, ge=4)
    workers: int = Field(2, ge=1)  # processes computing signatures and rules (the decisions stay in order)
    # records between resumable state saves: each pickles the whole state (keys, LSH, signatures), so saves
    # cost grows with the corpus -- frequent saves on a large corpus cost more than they protect
    checkpoint_every: int = Field(50_000, ge=1)
    seed: int = 1  # MinHash permutations: the same seed gives the same decisions

    @model_validator(mode="after")
    def _short_items(self):
        if self.decontam_min_item >= self.decontam_ngram:
            raise ValueError(f"decontam_min_item {self.decontam_min_item} must be smaller than decontam_ngram "
                             f"{self.decontam_ngram} (it is the length of the shorter items matched whole)")
        return self
