"""Causal graph and time features of transactions, computed from the stream in time order.

A transaction's fraud signal lives in the graph *and in time*: a card's first visit to a
merchant, many cards new to one merchant in the same week, a card hitting several new
merchants in days, a merchant where fraud was reported before. Each feature of a row is
computed from the rows strictly earlier in time (never the row itself, never a row of the
same minute, never a later one), and the label-aware ones only from labels older than
``label_delay_days`` (chargebacks arrive late). So the same code serves batch preprocessing
(the full stream, before deduplication and undersampling: counts over a thinned stream
would be wrong) and the scoring of new rows (a saved trailing history plus the new rows):
a row's features depend only on the rows within ``history_days(label_delay_days)`` before it.

How: one sort of the stream by (card, time), by (merchant, time) and by (card-merchant pair,
time); a trailing window's count or sum at a row is a difference of prefix sums between two
binary searches in the sorted keys. Rows are only ever *queried* where features are needed
(the kept rows), so memory is a few arrays of the stream's length, not a table.

Edge cases, by design (tests/test_features.py): rows may come in any order (each row's
features depend only on the set of earlier rows); rows of the same minute do not see each
other; a card or merchant with no earlier row (never seen, or not within the windows: a gap in
the history) has zero counts, ``pair_first_visit`` 1, and its time since the last row capped at
the window's length; a row to score whose windows reach before the saved history is refused
(``preprocess.with_causal_features``); labels of -1 (unknown) are never counted.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np
import pandas as pd

FEATURE_SETS = ("causal", "blueprint")
DEFAULT_LABEL_DELAY_DAYS = 60
DAY = 1440  # minutes
WINDOWS_DAYS = (1, 7, 30)  # trailing count windows
NOVELTY_DAYS = 365  # a visit is a first visit when the pair has no visit in this window before
BASELINE_DAYS = 90  # the merchant's usual weekly count of new cards: over the 90 days before the week
AMOUNT_DAYS = 90  # amount against the card's / merchant's amounts of this window
LABEL_WINDOW_DAYS = 365  # label-aware counts: labels in this window before the delay cut
PRIOR_RATE, PRIOR_WEIGHT = 0.002, 20.0
_FIXED = 4096  # log-amount resolution (1/4096) of the amount statistics  # smoothing of the merchant fraud rate (fixed: stream-independent)

NAMES = (
    "card_tx_1d", "card_tx_7d", "card_tx_30d",
    "card_new_merchants_1d", "card_new_merchants_7d",
    "card_hours_since_last",
    "pair_first_visit", "pair_days_since_last",
    "merchant_tx_1d", "merchant_tx_7d", "merchant_tx_30d",
    "merchant_new_cards_1d", "merchant_new_cards_7d", "merchant_new_cards_vs_usual",
    "merchant_days_active",
    "amount_vs_card", "amount_vs_merchant",
    "merchant_known_frauds", "merchant_fraud_rate", "card_known_frauds",
)


# The grouping whose rows each feature reads besides the row's own: its card (and the card's
# pairs), or its merchant. ``compute(groupings=...)`` computes one grouping's features only,
# and the dask engine's partitions hold whole groupings. A feature that reads other rows (e.g.
# its card's merchants' rows) fits neither: it must not be added to NAMES under these prefixes.
GROUPINGS = ("card", "merchant")
_PREFIXES = {"card": ("card_", "pair_", "amount_vs_card"), "merchant": ("merchant_", "amount_vs_merchant")}
GROUPING_OF = {name: next((g for g, prefixes in _PREFIXES.items() if name.startswith(prefixes)), None)
               for name in NAMES}
if None in GROUPING_OF.values():
    raise ValueError(f"features {[n for n, g in GROUPING_OF.items() if g is None]} read no known grouping: "
                     f"name them with a prefix of {_PREFIXES}, or partition them in the dask engine")
GROUPING_COLUMNS = {g: [i for i, name in enumerate(NAMES) if GROUPING_OF[name] == g] for g in GROUPINGS}


def history_days(label_delay_days: int) -> int:
    """How far back a row's features look: older rows never change them. The counts of first
    visits over a window look a further NOVELTY_DAYS back from each row in the window."""
    return max(NOVELTY_DAYS + BASELINE_DAYS + 7, AMOUNT_DAYS, label_delay_days + LABEL_WINDOW_DAYS)


@dataclass(frozen=True)
class Stream:
    """Transactions as plain arrays (any order): card id, merchant id, minute (since
    1970-01-01), amount, and fraud label (1, 0, or -1 when not known, e.g. rows to score)."""

    card: np.ndarray
    merchant: np.ndarray
    minute: np.ndarray
    amount: np.ndarray
    fraud: np.ndarray
    # The merchants as codes 0..k-1 when known (a categorical column's), else factorized when
    # needed; any numbering gives the same features. Not carried by take/concat.
    merchant_codes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.minute)

    def take(self, rows: np.ndarray) -> "Stream":
        return Stream(*(a[rows] for a in (self.card, self.merchant, self.minute, self.amount, self.fraud)))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"card": self.card, "merchant": self.merchant, "minute": self.minute,
                             "amount": self.amount, "fraud": self.fraud})

    @staticmethod
    def from_frame(frame: pd.DataFrame) -> "Stream":
        return Stream(*(frame[c].to_numpy() for c in ("card", "merchant", "minute", "amount", "fraud")))

    @staticmethod
    def concat(*streams: "Stream") -> "Stream":
        return Stream(*(np.concatenate([getattr(s, f) for s in streams])
                        for f in ("card", "merchant", "minute", "amount", "fraud")))


def minutes(year, month, day, time) -> np.ndarray:
    """Minutes since 1970-01-01 of TabFormer's Year, Month, Day and Time (minutes after midnight)."""
    # In place, adding the columns in their own small dtypes: no temporary of the stream's
    # length in a wider type.
    months = np.asarray(year, np.int32) - 1970
    months *= 12
    months += np.asarray(month)
    months -= 1
    first, last = int(months.min()), int(months.max())
    # Each month's first day from a table of the few hundred months present (a gather, not a
    # calendar conversion per row: 10x faster on the 24M rows of the whole file).
    # int32: minutes since 1970 fit until the year 6053 (half the memory of int64).
    start = np.arange(first, last + 1).astype("datetime64[M]").astype("datetime64[D]").astype(np.int32)
    months -= first
    days = start[months]
    del months
    days += np.asarray(day)
    days -= 1
    days *= DAY
    days += np.asarray(time)
    return days


def stream_of(frame: pd.DataFrame, max_cards: int, fraud: np.ndarray | None = None) -> Stream:
    """The stream of raw rows as ``tabformer.read_transactions`` returns them; card id =
    User * max_cards + Card (the graph's user node). ``fraud`` overrides the labels (-1: unknown)."""
    merchant, codes = frame["Merchant Name"], None
    if isinstance(merchant.dtype, pd.CategoricalDtype):
        codes = merchant.array.codes
        merchant = merchant.array.categories.to_numpy()[codes]
    return Stream(
        card=card_ids(frame, max_cards),
        merchant=np.asarray(merchant, dtype=np.int64),
        minute=minutes(frame["Year"], frame["Month"], frame["Day"], frame["Time"]),
        amount=frame["Amount"].to_numpy(np.float64),
        fraud=(frame["Is Fraud?"].to_numpy() if fraud is None else fraud).astype(np.int8),
        merchant_codes=None if codes is None or (codes < 0).any() else codes.astype(np.int32))


def card_ids(frame: pd.DataFrame, max_cards: int) -> np.ndarray:
    """The card id (the graph's user node) of raw rows: User * max_cards + Card, in int32 when
    it fits (half the memory of the whole file's 24M ids)."""
    user = frame["User"].to_numpy()
    dtype = np.int32 if (int(user.max(initial=0)) + 1) * max_cards < 2**31 else np.int64
    ids = user.astype(dtype)
    ids *= dtype(max_cards)  # in place: no temporary of the input's length (0.4 GB at 100M rows)
    ids += frame["Card"].to_numpy()
    return ids


_RADIX_BITS = 11  # digits of the radix sort: 2,048 buckets stay in cache


@numba.njit(cache=True, nogil=True)
def _radix_sort(key: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(key sorted, ``index`` in that order) of non-negative integer keys: a stable LSD radix
    sort, one pass per 11 bits of the largest key (4 passes for the 24M rows of the whole
    file, 3-5x faster than numpy's stable argsort of int64). Sorts in ``key`` and ``index``
    (their contents are lost) and one buffer of each."""
    n = len(key)
    top = 0
    for i in range(n):
        top = max(top, key[i])
    k0, k1 = key, np.empty_like(key)
    i0, i1 = index, np.empty_like(index)
    mask = (1 << _RADIX_BITS) - 1
    shift = 0
    while top >> shift:
        counts = np.zeros((1 << _RADIX_BITS) + 1, np.int64)
        for i in range(n):
            counts[((k0[i] >> shift) & mask) + 1] += 1
        for d in range(1 << _RADIX_BITS):
            counts[d + 1] += counts[d]
        for i in range(n):
            d = (k0[i] >> shift) & mask
            j = counts[d]
            counts[d] = j + 1
            k1[j] = k0[i]
            i1[j] = i0[i]
        k0, k1, i0, i1 = k1, k0, i1, i0
        shift += _RADIX_BITS
    return k0, i0


def _sort(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(key sorted, the stable order that sorts it; ``key`` may be overwritten). A stream read in (card, time) order
    sorts by card almost for free with numpy's timsort (it merges runs); otherwise the
    radix sort."""
    index = np.int32 if len(key) < 2**31 else np.int64
    if np.count_nonzero(key[1:] < key[:-1]) <= len(key) >> 8:
        order = np.argsort(key, kind="stable").astype(index, copy=False)
        return key[order], order
    return _radix_sort(key, np.arange(len(key), dtype=index))


@numba.njit(cache=True, nogil=True)
def _pair_keys(order, merchant, card, cards, t, span):
    key = np.empty(len(order), np.int64)
    for i in range(len(order)):
        r = order[i]
        key[i] = (np.int64(merchant[r]) * cards + card[r]) * span + t[r]
    return key


# What a sweep reports at each boundary (``_Sorted.sweep``).
_ROWS, _NEW, _AMOUNT, _SQUARES, _FRAUD, _KNOWN, _KEY_BEFORE, _KEY_AT = range(8)  # sums' columns first


@numba.njit(cache=True, nogil=True)
def _gather(order, first, amount, fraud):
    """``first``, ``amount`` and ``fraud`` in ``order`` (one pass over the order)."""
    n = len(order)
    f, a, y = np.empty(n, first.dtype), np.empty(n, amount.dtype), np.empty(n, fraud.dtype)
    for i in range(n):
        r = order[i]
        f[i], a[i], y[i] = first[r], amount[r], fraud[r]
    return f, a, y


@numba.njit(cache=True, nogil=True)
def _sweep(key, q, slot, first, amount, fraud, offsets, need, want_start, want_end, want_value):
    """One pass over the sorted stream for the sorted queries ``q``: a pointer per boundary
    (the first row with key >= query - offset) moves forward only, carrying the sums of the
    rows before it that the boundary's windows ``need`` (a flag per sum column). Reports, per
    query, each requested window's (between the boundaries ``want_start`` and ``want_end``)
    row count, sum of first visits, of log amounts, of their squares, frauds or known labels;
    or the key just before / at the start boundary's pointer (-1 when none); in row
    ``slot[j]`` of the output for query j."""
    n, b_count = len(key), len(offsets)
    pointer = np.zeros(b_count, np.int64)
    sums = np.zeros((b_count, 6), np.int64)
    out = np.empty((len(q), len(want_value)), np.int64)
    for j in range(len(q)):
        for b in range(b_count):
            limit = q[j] - offsets[b]
            i = pointer[b]
            if need[b, 1] or need[b, 2] or need[b, 4] or need[b, 5]:
                s1, s2, s3, s4, s5 = sums[b, 1], sums[b, 2], sums[b, 3], sums[b, 4], sums[b, 5]
                while i < n and key[i] < limit:
                    if need[b, 1]:
                        s1 += first[i]
                    if need[b, 2]:
                        a = np.int64(amount[i])
                        s2 += a
                        s3 += a * a
                    if need[b, 4]:
                        s4 += fraud[i] == 1
                    if need[b, 5]:
                        s5 += fraud[i] >= 0
                    i += 1
                sums[b, 1], sums[b, 2], sums[b, 3], sums[b, 4], sums[b, 5] = s1, s2, s3, s4, s5
            else:  # the row count is the pointer itself
                while i < n and key[i] < limit:
                    i += 1
            pointer[b] = i
            sums[b, 0] = i
        r = slot[j]
        for k in range(len(want_value)):
            lo, v = want_start[k], want_value[k]
            if v <= 5:
                out[r, k] = sums[want_end[k], v] - sums[lo, v]
            elif v == 6:
                out[r, k] = key[pointer[lo] - 1] if pointer[lo] > 0 else -1
            else:
                out[r, k] = key[min(pointer[lo], n - 1)]
    return out


class _Sorted:
    """The stream sorted by (group, minute) as keys ``group * span + minute``, with the query
    rows' keys, sorted too (answers come back in row order)."""

    def __init__(self, key: np.ndarray, order: np.ndarray, qkey: np.ndarray):
        """``key`` sorted, the ``order`` of the stream that sorts it, the queries' keys."""
        self.key, self.order = key, order
        self.q, self.qorder = _sort(qkey)
        self.back = np.empty_like(self.qorder)
        self.back[self.qorder] = np.arange(len(self.qorder))
        self._at = None

    @staticmethod
    def of(group: np.ndarray, t: np.ndarray, span: int, rows: np.ndarray) -> "_Sorted":
        key = group.astype(np.int64)  # in place from here: the stream may be 24M rows
        key *= span
        key += t
        qkey = key[rows]
        return _Sorted(*_sort(key), qkey)

    @staticmethod
    def pairs(merchant: np.ndarray, card: np.ndarray, t: np.ndarray, span: int, rows: np.ndarray,
              card_order: np.ndarray) -> "_Sorted":
        """Grouped by (merchant, card): the order by (card, minute) sorted again by merchant
        alone (stable), the keys made in one pass (no temporary of the stream's length). With
        the order by (merchant, minute) instead, ``merchant`` and ``card`` swap roles: grouped by
        (card, merchant), the same pairs."""
        cards = int(card.max()) + 1
        order = _radix_sort(merchant[card_order], card_order.copy())[1]
        qkey = (merchant[rows].astype(np.int64) * cards + card[rows]) * span + t[rows]
        return _Sorted(_pair_keys(order, merchant, card, cards, t, span), order, qkey)

    def sweep(self, first: np.ndarray, amount: np.ndarray, fraud: np.ndarray,
              wanted: dict[str, tuple[float, float, int]]) -> dict[str, np.ndarray]:
        """Per query (row order), each ``wanted`` name's value (``_sweep``) over the rows of the
        query's group in [row - start days, row - end days); ``first``, ``amount`` and
        ``fraud`` are per stream row."""
        days = sorted({d for start, end, _ in wanted.values() for d in (start, end)})
        start, end, value = (np.array([days.index(w[i]) if i < 2 else w[i] for w in wanted.values()], np.int64)
                             for i in range(3))
        need = np.zeros((len(days), 6), np.bool_)  # the sums each boundary carries
        for k in np.flatnonzero(value <= _KNOWN):
            need[[start[k], end[k]], value[k]] = True
        need[:, _AMOUNT] |= need[:, _SQUARES]  # carried together
        out = _sweep(self.key, self.q, self.qorder, *_gather(self.order, first, amount, fraud),
                     np.array([int(d * DAY) for d in days], np.int64), need, start, end, value)
        return {name: out[:, k] for k, name in enumerate(wanted)}

    def _at_queries(self) -> np.ndarray:
        """Sorted position of each (sorted) query's own key: where every window ending at the
        row ends, and one past its group's latest earlier row. Searched once."""
        if self._at is None:
            self._at = np.searchsorted(self.key, self.q, "left")
        return self._at

    def previous(self, within_days: int) -> tuple[np.ndarray, np.ndarray]:
        """Per query: (the group has an earlier row within the window, minutes since the latest
        one, else the window's length)."""
        j = self._at_queries()[self.back] - 1
        q = self.q[self.back]
        before = self.key[np.maximum(j, 0)]
        found = (j >= 0) & (before >= q - within_days * DAY)
        return found, np.where(found, q - before, within_days * DAY)

    def query_keys(self) -> np.ndarray:
        return self.q[self.back]


def _first_visits(by_pair: _Sorted) -> np.ndarray:
    """Per row: the card-merchant pair has no visit in the NOVELTY_DAYS strictly before it."""
    first = np.empty(len(by_pair.key), dtype=np.uint8)
    _mark_first_visits(by_pair.key, by_pair.order, NOVELTY_DAYS * DAY, first)
    return first.view(bool)


@numba.njit(cache=True, nogil=True)
def _mark_first_visits(key, order, window, first):
    """In sorted keys the latest strictly earlier row of the pair is just before the row's run
    of equal keys (same pair, same minute): a first visit when there is none within ``window``."""
    start = 0
    for i in range(len(key)):
        if i > 0 and key[i] != key[i - 1]:
            start = i
        first[order[i]] = not (start > 0 and key[start - 1] + window >= key[i])


def compute(stream: Stream, rows: np.ndarray | None = None,
            label_delay_days: int = DEFAULT_LABEL_DELAY_DAYS, groupings: tuple[str, ...] = GROUPINGS) -> np.ndarray:
    """Features (float32 [len(rows), len(NAMES)], columns as ``NAMES``) of ``stream``'s rows
    ``rows`` (all when None), each from the stream's rows strictly before it in time. Only the
    features of ``groupings`` (``GROUPING_OF``) are computed, the others' columns left 0: one
    grouping's sort and sweep less (the dask engine's partitions hold one grouping's rows)."""
    if label_delay_days < 0:
        raise ValueError(f"label_delay_days must be >= 0, got {label_delay_days!r}")
    if not groupings or set(groupings) - set(GROUPINGS):
        raise ValueError(f"groupings must be some of {GROUPINGS}, got {groupings!r}")
    n = len(stream)
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    if n == 0 or len(rows) == 0:
        return np.zeros((len(rows), len(NAMES)), dtype=np.float32)
    horizon = history_days(label_delay_days)
    pad = (horizon + 1) * DAY
    # int32 where it fits: the stream can be the whole file (24M rows), keys are made in int64.
    t = (stream.minute - int(stream.minute.min()) + pad).astype(np.int32)  # keys never reach a lower group
    span = int(t.max()) + 1
    low, high = int(stream.card.min()), int(stream.card.max())
    # Card ids (user * cards + card) are dense enough to be codes themselves.
    if high - low >= 2**24:
        card = pd.factorize(stream.card)[0].astype(np.int32)
    elif low >= 0 and stream.card.dtype == np.int32:
        card = stream.card  # no copy (memory)
    else:
        card = (stream.card - low).astype(np.int32)
    merchant = stream.merchant_codes if stream.merchant_codes is not None else \
        pd.factorize(stream.merchant)[0].astype(np.int32)
    out = {}
    with ThreadPoolExecutor(1) as pool:  # the merchants' grouping on the second core
        by_merchant = pool.submit(_Sorted.of, merchant, t, span, rows) if "merchant" in groupings else None
        # Then the log amounts, on the same core while this one makes the pairs: the merchants'
        # sweep, which needs them, starts as soon as the first visits are marked.
        log_amounts = pool.submit(_log_amounts, stream.amount)
        if "card" in groupings:
            by_card = _Sorted.of(card, t, span, rows)
            by_pair = _Sorted.pairs(merchant, card, t, span, rows, by_card.order)
        else:  # the pairs from the merchants' order (no card sort)
            by_card, by_pair = None, _Sorted.pairs(card, merchant, t, span, rows, by_merchant.result().order)
        first = _first_visits(by_pair).view(np.uint8)
        if by_card is not None:
            seen, gap = by_pair.previous(NOVELTY_DAYS)
            out["pair_first_visit"] = (~seen).astype(np.float32)
            out["pair_days_since_last"] = np.log1p(gap / DAY).astype(np.float32)
            del seen, gap
        del by_pair, t  # (memory) the merchants' sort holds t until it is done

        log_amount = log_amounts.result()
        stream_values = (first, log_amount, stream.fraud, log_amount[rows] / _FIXED, label_delay_days, horizon)
        merchants_part = None if by_merchant is None else pool.submit(_merchant_features, by_merchant, *stream_values)
        del by_merchant  # the worker holds the only reference: freed when its features are done
        if by_card is not None:
            out |= _grouping_features("card", by_card, *stream_values)
        del by_card
        if merchants_part is not None:
            out |= merchants_part.result()
    values = np.zeros((len(rows), len(NAMES)), dtype=np.float32, order="F")  # columns filled and read whole
    for i, name in enumerate(NAMES):
        if name in out:
            values[:, i] = out.pop(name)  # each column freed once copied (memory)
    return values


def _log_amounts(amount: np.ndarray) -> np.ndarray:
    """Log amounts in fixed point (int32, 1/_FIXED): integer prefix sums are exact, so a row's
    statistics do not depend on which other rows (groups, later rows) the stream holds; the
    squares' sums stay below 2**63 up to ~10**9 rows."""
    log_amount = np.abs(amount)
    np.log1p(log_amount, out=log_amount)
    log_amount *= _FIXED
    np.copysign(log_amount, amount, out=log_amount)
    return np.rint(log_amount, out=log_amount).astype(np.int32)


def _merchant_features(by_merchant, *stream_values) -> dict[str, np.ndarray]:
    sorted_ = by_merchant.result()
    del by_merchant
    return _grouping_features("merchant", sorted_, *stream_values)


def _grouping_features(kind: str, s: _Sorted, first: np.ndarray, log_amount: np.ndarray, fraud: np.ndarray,
                       own: np.ndarray, label_delay_days: int, horizon: int) -> dict[str, np.ndarray]:
    """The features of one grouping (``kind`` card or merchant) from its sorted stream ``s``."""
    counterparts = "merchants" if kind == "card" else "cards"
    # Windows [row - start days, row - end days) of the row's group: (start, end, what).
    label = (label_delay_days + LABEL_WINDOW_DAYS, label_delay_days)
    wanted = {"count": (AMOUNT_DAYS, 0, _ROWS), "amount": (AMOUNT_DAYS, 0, _AMOUNT),
              "squares": (AMOUNT_DAYS, 0, _SQUARES), "frauds": (*label, _FRAUD)}
    for days in WINDOWS_DAYS:
        wanted[f"tx_{days}"] = (days, 0, _ROWS)
        if days <= 7:
            wanted[f"new_{days}"] = (days, 0, _NEW)
    if kind == "card":
        wanted["before"] = (0, 0, _KEY_BEFORE)
    else:
        wanted |= {"known": (*label, _KNOWN), "usual": (BASELINE_DAYS + 7, 7, _NEW),
                   "active": (horizon, 0, _ROWS), "oldest": (horizon, 0, _KEY_AT)}
    w = s.sweep(first, log_amount, fraud, wanted)
    s.key = s.order = None  # (memory) done with the sorted stream; its queries stay
    out = {}
    for days in WINDOWS_DAYS:
        out[f"{kind}_tx_{days}d"] = np.log1p(w[f"tx_{days}"])
        if days <= 7:
            out[f"{kind}_new_{counterparts}_{days}d"] = np.log1p(w[f"new_{days}"])
    count = w["count"]
    mean = np.divide(w["amount"], count * _FIXED, out=np.zeros(len(own)), where=count > 0)
    var = np.divide(w["squares"], count * _FIXED**2, out=np.zeros(len(own)), where=count > 0) - mean ** 2
    out[f"amount_vs_{kind}"] = np.where(count > 0, (own - mean) / (np.sqrt(np.maximum(var, 0.0)) + 0.25), 0.0)
    # Label-aware: only labels of rows older than the delay, over the window before that cut.
    out[f"{kind}_known_frauds"] = np.log1p(w["frauds"])
    q = s.query_keys()
    if kind == "card":
        found = (w["before"] >= 0) & (w["before"] >= q - horizon * DAY)
        out["card_hours_since_last"] = np.log1p(np.where(found, q - w["before"], horizon * DAY) / 60.0)
    else:
        out["merchant_fraud_rate"] = (w["frauds"] + PRIOR_RATE * PRIOR_WEIGHT) / (w["known"] + PRIOR_WEIGHT)
        usual = w["usual"] * 7.0 / BASELINE_DAYS
        out["merchant_new_cards_vs_usual"] = np.log((w["new_7"] + 1.0) / (usual + 1.0))
        out["merchant_days_active"] = np.log1p(np.where(w["active"] > 0, q - w["oldest"], 0) / DAY)
    return {name: v.astype(np.float32) for name, v in out.items()}


def history(stream: Stream, since_minute: int, label_delay_days: int) -> Stream:
    """The rows a scorer needs to compute the features of rows from ``since_minute`` on:
    those within ``history_days`` before it, and every later one."""
    keep = stream.minute >= since_minute - history_days(label_delay_days) * DAY
    return stream.take(np.flatnonzero(keep))


def for_new_rows(history_stream: Stream, new: Stream, label_delay_days: int = DEFAULT_LABEL_DELAY_DAYS) -> np.ndarray:
    """Features of ``new`` rows (their labels unknown) from a saved history and each other.

    A new row with the same card, merchant, minute and amount as a history row is that
    transaction (e.g. a row of the history's own period scored again): it is counted once,
    with the label the history holds, so it gets exactly its batch features.
    """
    # A row's features read only its card's rows and its merchant's rows (first visits: the
    # pair's, among both): the rest of the history (millions of rows) is left out of the sorts.
    history_stream = history_stream.take(np.flatnonzero(np.isin(history_stream.card, new.card)
                                                        | np.isin(history_stream.merchant, new.merchant)))
    key = ["card", "merchant", "minute", "amount"]
    held = history_stream.frame()[key].reset_index(drop=True)
    held["position"] = np.arange(len(held))
    held = held.drop_duplicates(key, keep="first")
    position = new.frame()[key].merge(held, on=key, how="left")["position"].to_numpy()
    fresh = np.isnan(position)
    appended = new.take(np.flatnonzero(fresh))
    both = Stream.concat(history_stream, Stream(appended.card, appended.merchant, appended.minute,
                                                appended.amount, np.full(len(appended), -1, np.int8)))
    position[fresh] = len(history_stream) + np.arange(len(appended))
    return compute(both, position.astype(np.int64), label_delay_days)
