"""Synthetic transactions in exactly the IBM TabFormer ``card_transaction.v1.csv`` format.

The real file cannot be downloaded automatically, so the pipeline's default input is made
here. The fraud comes from mechanisms that live in the card/merchant graph and in time
(compromised merchants, fraud rings hitting mule merchants, card testing; their mix drifts
over the years), while the per-row features (amount, chip, errors, location) are only weakly
informative. Legitimate look-alikes (promotions and store openings, trips, events) crowd the
graph the same way, so no single crowding signal is fraud. ``regime`` switches one mechanism on
at a time, or makes fraud rows without any graph structure (``row_only``, a control).
docs/synthetic_data.md describes the mechanisms and the marginals.

The output depends only on ``seed``, ``n_rows`` and ``regime``: every user's rows come from
their own random stream and chunks end on user boundaries, so ``chunk_rows`` changes memory
use, never the bytes. ``files`` cuts the same rows into that many files of equal row counts
(``part-0000.csv``, ...; each with the header), whose rows in name order are the single file's.
Memory does not grow with ``n_rows`` beyond the world (users, cards, merchants: 2,000 users
and 100,343 merchants at full size) and the planted rows (~1% of the rows): the peak RSS is
0.62 GB at 5M rows, 0.69 GB at 24.4M and 0.75 GB at 100M (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

HEADER = (
    "User,Card,Year,Month,Day,Time,Amount,Use Chip,Merchant Name,Merchant City,"
    "Merchant State,Zip,MCC,Errors?,Is Fraud?\n"
)

# The real file, which the marginals scale from.
ROWS_FULL = 24_386_900
USERS_FULL = 2_000
MERCHANTS_FULL = 100_343
FRAUD_RATE = 29_757 / ROWS_FULL

FIRST_DAY = np.datetime64("1991-01-01", "D")
LAST_DAY = np.datetime64("2020-02-28", "D")  # the real file ends here
N_DAYS = int((LAST_DAY - FIRST_DAY).astype(int)) + 1
MINUTES_PER_DAY = 1440

# Fraud periods: the pipeline splits train < 2018, validation 2018, test >= 2019, so each
# gets its own fraud budget (with a floor, so small files still have fraud in each). None in 2020.
FRAUD_PERIODS = (("1991-01-01", "2017-12-31"), ("2018-01-01", "2018-12-31"), ("2019-01-01", "2019-12-31"))
FRAUD_FLOOR_PER_PERIOD = 4  # at most one fraud per 300 rows, so tiny files are not mostly fraud

CHIP_NAMES = ("Swipe Transaction", "Chip Transaction", "Online Transaction")
SWIPE, CHIP, ONLINE = 0, 1, 2
ONLINE_LOC = 0  # location 0 is City ONLINE, empty State and Zip
KIND_ONLINE, KIND_CHAIN, KIND_LOCAL = 0, 1, 2

# 109 merchant category codes, most common first (their popularity follows this order).
MCCS = (
    5411, 5812, 5499, 5541, 5300, 5912, 5814, 4829, 5311, 5310, 4784, 5651, 4121, 7538, 5942,
    5719, 5732, 5815, 4900, 4814, 4899, 5211, 5251, 5261, 5621, 5655, 5661, 5712, 5722, 5733,
    5813, 5921, 5932, 5947, 5970, 5977, 6300, 7011, 7210, 7230, 7276, 7349, 7393, 7531, 7542,
    7549, 7801, 7802, 7832, 7922, 7995, 7996, 8011, 8021, 8041, 8043, 8049, 8062, 8099, 8111,
    8931, 9402, 1711, 3000, 3001, 3005, 3006, 3007, 3008, 3009, 3058, 3066, 3075, 3132, 3144,
    3174, 3256, 3260, 3359, 3387, 3389, 3390, 3393, 3395, 3405, 3504, 3509, 3596, 3640, 3684,
    3722, 3730, 3771, 3775, 3780, 4111, 4112, 4131, 4214, 4411, 4511, 4722, 5045, 5094, 5192,
    5193, 5533, 5816, 6051,
)

# Some fraud-infrastructure merchants (mules, cash-out, card testing) trade under these
# categories, rare in ordinary shopping: a mark a model can only carry to the rest of a
# campaign (other merchants, the cards' other rows) through the graph.
MULE_MCC, TESTER_MCC = 6051, 5816  # quasi-cash, digital goods
INFRA_MCC_SHARE = 0.3

# Which fraud the file holds (docs/synthetic_data.md): all three mechanisms mixed by year, one
# mechanism alone, or a control whose fraud rows have no graph structure at all.
# The generator's version: bumped whenever the same seed and rows give other data (cached
# files are named with it, so an older generator's file is never taken for this one's).
VERSION = 3
REGIMES = ("default", "compromised_merchant", "fraud_ring", "card_testing", "row_only")

# Legitimate look-alikes, counted against the fraud plan so crowding alone is never fraud:
# promotions and events per (expected) campaign, trips per fraud row.
ROWS_PER_CAMPAIGN = 60  # about the mean fraud rows of a campaign
PROMOTIONS_PER_CAMPAIGN = 1.5
EVENTS_PER_CAMPAIGN = 0.3
TRIPS_PER_FRAUD_ROW = 0.35

ERROR_VALUES = (
    "Insufficient Balance", "Bad PIN", "Technical Glitch", "Bad Card Number", "Bad Expiration",
    "Bad CVV", "Bad Zipcode",
)
# (errors, weight for normal rows, weight for fraud rows); fraud leans to card-data errors.
_ERROR_SETS = (
    (("Insufficient Balance",), 0.50, 0.30),
    (("Bad PIN",), 0.12, 0.10),
    (("Technical Glitch",), 0.12, 0.05),
    (("Bad Card Number",), 0.05, 0.15),
    (("Bad Expiration",), 0.04, 0.12),
    (("Bad CVV",), 0.04, 0.15),
    (("Bad Zipcode",), 0.02, 0.04),
    (("Bad PIN", "Insufficient Balance"), 0.02, 0.02),
    (("Bad PIN", "Technical Glitch"), 0.01, 0.01),
    (("Bad Card Number", "Bad Expiration"), 0.01, 0.02),
    (("Bad Card Number", "Bad CVV"), 0.01, 0.02),
    (("Bad Expiration", "Bad CVV"), 0.01, 0.01),
    (("Bad CVV", "Insufficient Balance"), 0.01, 0.01),
    (("Bad Zipcode", "Insufficient Balance"), 0.01, 0.01),
)
ERROR_RATE_NORMAL, ERROR_RATE_FRAUD = 0.016, 0.025
REFUND_RATE = 0.012

# Geography (seed-independent, like the real country): (state, first zip3, last zip3, people in millions).
_STATES = (
    ("MA", 10, 27, 6.9), ("RI", 28, 29, 1.1), ("NH", 30, 38, 1.4), ("ME", 39, 49, 1.3),
    ("VT", 50, 59, 0.6), ("CT", 60, 69, 3.6), ("NJ", 70, 89, 9.0), ("NY", 100, 149, 19.0),
    ("PA", 150, 196, 13.0), ("DE", 197, 199, 1.0), ("DC", 200, 205, 0.7), ("MD", 206, 219, 6.0),
    ("VA", 220, 246, 8.5), ("WV", 247, 268, 1.8), ("NC", 270, 289, 10.4), ("SC", 290, 299, 5.1),
    ("GA", 300, 319, 10.6), ("FL", 320, 349, 21.0), ("AL", 350, 369, 4.9), ("TN", 370, 385, 6.8),
    ("MS", 386, 397, 3.0), ("KY", 400, 427, 4.5), ("OH", 430, 459, 11.7), ("IN", 460, 479, 6.7),
    ("MI", 480, 499, 10.0), ("IA", 500, 528, 3.2), ("WI", 530, 549, 5.8), ("MN", 550, 567, 5.6),
    ("SD", 570, 577, 0.9), ("ND", 580, 588, 0.8), ("MT", 590, 599, 1.1), ("IL", 600, 629, 12.7),
    ("MO", 630, 658, 6.1), ("KS", 660, 679, 2.9), ("NE", 680, 693, 1.9), ("LA", 700, 714, 4.6),
    ("AR", 716, 729, 3.0), ("OK", 730, 749, 3.9), ("TX", 750, 799, 29.0), ("CO", 800, 816, 5.7),
    ("WY", 820, 831, 0.6), ("ID", 832, 838, 1.8), ("UT", 840, 847, 3.2), ("AZ", 850, 865, 7.2),
    ("NM", 870, 884, 2.1), ("NV", 889, 898, 3.1), ("CA", 900, 961, 39.0), ("HI", 967, 968, 1.4),
    ("OR", 970, 979, 4.2), ("WA", 980, 994, 7.6), ("AK", 995, 999, 0.7),
)
_CITY_PREFIXES = (
    "Oak", "Maple", "Cedar", "Pine", "Elm", "Spring", "River", "Lake", "Fair", "Green", "Red",
    "White", "Clear", "Rock", "Sand", "Silver", "Gold", "Brook", "Wood", "Mill", "Bridge", "Glen",
    "Ash", "Bay", "Cliff", "High", "Mount", "North", "South", "East", "West", "New", "Port",
    "Fort", "Salem", "Union", "Granite", "Iron", "Stone", "Willow", "Hazel", "Laurel", "Holly",
    "Rose", "Sun", "Star", "Eagle", "Fox", "Deer", "Bear", "Wolf", "Hawk", "Crow", "Swan", "Mar",
    "Bel", "Clay", "Hill", "Plain", "Meadow", "La", "San", "Monte", "Del",
)
_CITY_SUFFIXES = (
    "ton", "ville", "field", "wood", "dale", "burg", "port", "ford", "land", "view", "side",
    "mont", "haven", "bury", "ridge", "crest", "brook", "worth", "chester", "ley", " City",
    " Springs", " Falls", " Heights", " Park", " Grove", " Hills", " Valley", " Point", " Beach",
    " Verne", " Rio",
)
_FOREIGN = (
    ("Rome", "Italy"), ("Milan", "Italy"), ("Paris", "France"), ("London", "United Kingdom"),
    ("Dublin", "Ireland"), ("Berlin", "Germany"), ("Amsterdam", "Netherlands"),
    ("Madrid", "Spain"), ("Lisbon", "Portugal"), ("Athens", "Greece"), ("Zurich", "Switzerland"),
    ("Tokyo", "Japan"), ("Seoul", "South Korea"), ("Beijing", "China"), ("Shanghai", "China"),
    ("Mumbai", "India"), ("Manila", "Philippines"), ("Bangkok", "Thailand"), ("Sydney", "Australia"),
    ("Auckland", "New Zealand"), ("Suva", "Fiji"), ("Toronto", "Canada"), ("Vancouver", "Canada"),
    ("Cancun", "Mexico"), ("Mexico City", "Mexico"), ("Kingston", "Jamaica"), ("Nassau", "Bahamas"),
    ("Santo Domingo", "Dominican Republic"), ("Port-au-Prince", "Haiti"), ("San Juan", "Puerto Rico"),
    ("Lima", "Peru"), ("Bogota", "Colombia"), ("Cairo", "Egypt"), ("Nairobi", "Kenya"),
    ("Lagos", "Nigeria"), ("Istanbul", "Turkey"), ("Dubai", "United Arab Emirates"),
)
_GEO_SEED = 20_191_231  # the geography is the same for every seed
_N_CITIES = 12_000
_FOREIGN_LOCAL_SHARE = 0.015
_CARDS_PER_USER_P = (0.20, 0.24, 0.21, 0.14, 0.09, 0.06, 0.035, 0.015, 0.01)  # 1..9 cards
_FORMAT_ROWS = 1 << 20  # rows formatted at once: keeps each joined string array far below 2 GiB
PART_NAME = "part-{:04d}.csv"  # the files of generate(files=N), in row order
PART_PATTERN = re.compile(r"part-\d{4,}\.csv")


@dataclass
class SyntheticSummary:
    """What was written: counts of distinct users/cards/merchants that appear in the file."""

    rows: int
    users: int
    cards: int
    merchants: int
    frauds: int
    path: Path  # the file, or with several files their folder
    seconds: float
    files: tuple[Path, ...] = ()  # the files written, in row order


@dataclass
class _World:
    """Everything decided before streaming: geography, merchants, users, cards, fraud plan."""

    loc_text: list[str]  # per location "City,State,Zip,"
    city_of_loc: np.ndarray
    merchant_name: np.ndarray  # int64, unique
    merchant_kind: np.ndarray
    merchant_loc: np.ndarray  # location of local merchants (ONLINE_LOC otherwise)
    merchant_mcc: np.ndarray  # index into MCCS
    mcc_mu: np.ndarray  # log of the median amount in dollars, per MCC
    online_ids: np.ndarray
    online_cum: np.ndarray
    chain_ids: np.ndarray
    chain_cum: np.ndarray
    local_ids: np.ndarray  # local merchants (any city, foreign included): travel destinations
    city_local_start: np.ndarray  # CSR: local US merchants of city c = city_local_ids[start[c]:start[c+1]]
    city_local_ids: np.ndarray
    user_home_city: np.ndarray
    user_home_loc: np.ndarray
    user_p_online: np.ndarray
    user_p_travel: np.ndarray
    user_hour: np.ndarray
    user_amount_shift: np.ndarray
    user_card_start: np.ndarray  # CSR: cards of user u = user_card_start[u]:user_card_start[u+1]
    card_user: np.ndarray
    card_local: np.ndarray  # card index within its user
    card_open: np.ndarray  # day index
    card_close: np.ndarray
    card_rows: np.ndarray  # rows of each card in the file, planted ones included
    cum_g: np.ndarray  # cumulative per-card activity over days (rows are drawn from it)
    target: np.ndarray  # activity per day (the shape of the file over time)
    seed: int
    n_us_locs: int  # locations [1, n_us_locs) are in the US, the rest abroad
    loc_state: np.ndarray  # state index per location (-1 online or abroad)
    user_home_state: np.ndarray
    planted: dict[str, np.ndarray]  # planted rows (fraud and look-alikes), sorted by card
    planted_start: np.ndarray  # CSR over cards into `planted`
    stats: dict[str, np.ndarray]  # start days of the plan's look-alikes and campaigns, by kind


# ---------------------------------------------------------------- public API


def generate(
    path: str | os.PathLike,
    n_rows: int,
    seed: int = 0,
    chunk_rows: int = 1_000_000,
    progress: bool = False,
    regime: str = "default",
    files: int = 1,
) -> SyntheticSummary:
    """Write ``n_rows`` synthetic transactions to ``path`` (TabFormer CSV format); with
    ``files`` > 1, ``path`` is a folder that receives ``part-0000.csv``, ``part-0001.csv``, ...
    (``PART_NAME``), each with the header and ``n_rows / files`` rows (rounded), whose rows in
    name order are the single file's (read them as ``<path>/part-*.csv``).

    ``regime`` picks the fraud (one of REGIMES): ``default`` mixes compromised merchants, fraud
    rings and card testing, drifting over the years; ``compromised_merchant``, ``fraud_ring`` and
    ``card_testing`` hold that mechanism alone (same fraud budget); ``row_only`` is a control
    whose fraud rows are lone rows with no graph structure. Every regime holds the same
    legitimate look-alikes (promotions, openings, trips, events) that crowd like fraud.

    The output appears only when complete (written to a temporary file, or folder, in the same
    folder, then renamed; several files replace only an earlier run's part files); missing
    parent folders are created. Same ``seed``, ``n_rows`` and ``regime`` give byte-identical
    rows whatever ``chunk_rows`` is; ``chunk_rows`` bounds the rows held in memory at once (a
    single user's rows are never split).
    """
    _check_regime(regime)
    _check_count("n_rows", n_rows, minimum=1)
    _check_count("seed", seed, minimum=0)
    _check_count("chunk_rows", chunk_rows, minimum=1)
    _check_count("files", files, minimum=1)
    n_rows, seed, chunk_rows, files = int(n_rows), int(seed), int(chunk_rows), int(files)
    if files > n_rows:
        raise ValueError(f"synthetic.generate: files must be at most n_rows ({n_rows:,}), got {files:,}")
    out = Path(path)
    if files == 1 and out.is_dir():
        raise IsADirectoryError(f"synthetic data output {out} is a folder; give a file path such as {out / 'card_transaction.v1.csv'}")
    if files > 1:
        _check_parts_folder(out)
    started = time.perf_counter()
    world = _build_world(n_rows, seed, regime)
    tables = _string_tables(world)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Our own name rather than tempfile's: the file then gets the usual umask permissions.
        tmp = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        if files > 1:
            tmp.mkdir()
        parts = _Parts([tmp / PART_NAME.format(i) for i in range(files)] if files > 1 else [tmp], n_rows)
    except OSError as exc:
        raise OSError(f"cannot write synthetic data into folder {out.parent} ({exc.strerror or exc}); "
                      "choose an output path in a writable folder") from exc
    merchants_seen = np.zeros(world.merchant_name.size, dtype=bool)
    frauds = written = 0
    try:
        # Formatting and writing one block overlaps generating the next (both release the GIL).
        with parts, ThreadPoolExecutor(max_workers=1) as writer:
            pending = None
            for block in _blocks(world, seed, chunk_rows):
                merchants_seen[block["merchant"]] = True
                frauds += int(block["fraud"].sum())
                written += block["card"].size
                if pending is not None:
                    pending.result()
                pending = writer.submit(parts.write, block, world, tables)
                if progress:
                    print(f"synthetic: {written:,}/{n_rows:,} rows ({written / n_rows:.0%}) "
                          f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
            if pending is not None:
                pending.result()
        if written != n_rows:  # an internal invariant; never leave a wrong-sized file
            raise RuntimeError(f"synthetic generator wrote {written} rows instead of {n_rows}")
        _replace(tmp, out, files)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)
        raise
    cards_with_rows = world.card_rows > 0
    return SyntheticSummary(
        rows=written,
        users=int(np.unique(world.card_user[cards_with_rows]).size),
        cards=int(cards_with_rows.sum()),
        merchants=int(merchants_seen.sum()),
        frauds=frauds,
        path=out,
        seconds=time.perf_counter() - started,
        files=tuple(out / PART_NAME.format(i) for i in range(files)) if files > 1 else (out,),
    )


class _Parts:
    """The output files, in row order, each opened (with the header) when its first row comes:
    file ``i`` takes rows [n_rows * i // files, n_rows * (i + 1) // files)."""

    def __init__(self, paths: list[Path], n_rows: int):
        self.paths, self.index, self.written, self.handle = paths, 0, 0, None
        self.ends = [n_rows * (i + 1) // len(paths) for i in range(len(paths))]
        self._open()  # the first file now: an unwritable folder fails before any generating

    def _open(self) -> None:
        self.handle = open(self.paths[self.index], "xb")
        self.handle.write(HEADER.encode())

    def write(self, block: dict[str, np.ndarray], world: _World, tables: _Tables) -> None:
        start, size = 0, block["card"].size
        while start < size:
            if self.handle is None:
                self.index += 1
                self._open()
            take = min(size - start, self.ends[self.index] - self.written)
            _write_block(self.handle, {k: v[start:start + take] for k, v in block.items()} if take < size else block,
                         world, tables)
            start += take
            self.written += take
            if self.written == self.ends[self.index] and self.index + 1 < len(self.paths):
                self.handle.close()
                self.handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()


def _check_parts_folder(out: Path) -> None:
    """Several files go to a folder: a new one, or one holding only an earlier run's part files."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"synthetic data output {out} is a file; with several files give a folder path")
    others = sorted(p.name for p in out.iterdir() if not PART_PATTERN.fullmatch(p.name)) if out.is_dir() else []
    if others:
        raise FileExistsError(f"synthetic data output folder {out} holds other files ({', '.join(others[:3])}); "
                              "give a new folder, or one holding only part files of an earlier run")


def _replace(tmp: Path, out: Path, files: int) -> None:
    """The complete output in place of ``out``: a file renamed; a folder of part files renamed
    over the earlier one (moved aside first, then deleted), so no mix of runs is ever visible."""
    if files == 1 or not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.old"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old)


def _check_regime(regime) -> None:
    if regime not in REGIMES:
        raise ValueError(f"synthetic.generate: unknown regime {regime!r}; choose one of {', '.join(REGIMES)}")


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"synthetic.generate: {name} must be an integer >= {minimum}, got {value!r}")


# ---------------------------------------------------------------- the world


def _scaled_counts(n_rows: int) -> tuple[int, int]:
    """Users and merchants: proportional to the real file, with floors so small files stay graph-like."""
    share = n_rows / ROWS_FULL
    users = max(round(USERS_FULL * share), min(50, max(1, n_rows // 100)))
    merchants = max(round(MERCHANTS_FULL * share), min(2_000, max(30, n_rows // 10)))
    return users, merchants


def _day_index(date: str) -> int:
    return int((np.datetime64(date, "D") - FIRST_DAY).astype(int))


def _calendar() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    days = FIRST_DAY + np.arange(N_DAYS)
    years = days.astype("datetime64[Y]").astype(int) + 1970
    months = days.astype("datetime64[M]").astype(int) % 12 + 1
    dom = (days - days.astype("datetime64[M]")).astype(int) + 1
    return years, months, dom


def _target_rows_per_day(years: np.ndarray) -> np.ndarray:
    """Activity grows from 1991, passes half in 2001 and plateaus after ~2008."""
    year_weight = 1.0 / (1.0 + np.exp(-(years - 2001.0) / 3.0))
    return year_weight / 365.25


def _zipf_cum(n: int, exponent: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** exponent
    return np.cumsum(w) / w.sum()


def _geography() -> tuple[list[str], np.ndarray, np.ndarray, int]:
    """US cities with 1-4 zips each, then foreign cities; location 0 is ONLINE."""
    rng = np.random.default_rng(_GEO_SEED)
    pop = np.array([s[3] for s in _STATES])
    n_cand = _N_CITIES * 2
    state = rng.choice(len(_STATES), size=n_cand, p=pop / pop.sum())
    name = rng.integers(0, len(_CITY_PREFIXES) * len(_CITY_SUFFIXES), size=n_cand)
    _, first = np.unique(state * 10_000 + name, return_index=True)  # one city per (state, name)
    keep = np.sort(first)[:_N_CITIES]
    state, name = state[keep], name[keep]
    city_weight = rng.lognormal(0.0, 1.3, size=keep.size) * pop[state] / np.bincount(state, minlength=len(_STATES))[state]
    n_zips = rng.geometric(0.45, size=keep.size)
    city = np.repeat(np.arange(keep.size), n_zips)
    lo = np.array([s[1] for s in _STATES])[state]
    hi = np.array([s[2] for s in _STATES])[state]
    zip3 = lo + (rng.random(keep.size) * (hi - lo + 1)).astype(np.int64)
    zips = zip3[city] * 100 + rng.integers(0, 100, size=city.size)
    city_zip = np.unique(city * 100_000 + zips)  # sorted by city
    city, zips = city_zip // 100_000, city_zip % 100_000
    names = [_CITY_PREFIXES[n // len(_CITY_SUFFIXES)] + _CITY_SUFFIXES[n % len(_CITY_SUFFIXES)] for n in name.tolist()]
    codes = [s[0] for s in _STATES]
    # Zip as float text, as the real file has it: 01720 is written 1720.0.
    loc_text = ["ONLINE,,,"] + [f"{names[c]},{codes[state[c]]},{z}.0," for c, z in zip(city.tolist(), zips.tolist())]
    city_of_loc = [-1] + city.tolist()
    n_us = len(loc_text)
    for i, (city, country) in enumerate(_FOREIGN):
        loc_text.append(f"{city},{country},,")  # abroad: the State column holds the country
        city_of_loc.append(keep.size + i)
    return loc_text, np.asarray(city_of_loc), city_weight / city_weight.sum(), n_us


def _build_world(n_rows: int, seed: int, regime: str = "default") -> _World:
    _check_regime(regime)
    rng = np.random.default_rng([seed, 0])
    n_users, n_merchants = _scaled_counts(n_rows)
    loc_text, city_of_loc, city_p, n_us_locs = _geography()
    state_codes = {s[0]: i for i, s in enumerate(_STATES)}
    loc_state = np.array([state_codes.get(t.split(",")[1], -1) for t in loc_text])
    n_cities = city_p.size
    us_locs = np.arange(1, n_us_locs)
    loc_order = us_locs[np.argsort(city_of_loc[us_locs], kind="stable")]
    city_loc_start = np.searchsorted(city_of_loc[loc_order], np.arange(n_cities + 1))

    def random_loc_in(cities: np.ndarray) -> np.ndarray:
        lo, hi = city_loc_start[cities], city_loc_start[cities + 1]
        return loc_order[lo + (rng.random(cities.size) * (hi - lo)).astype(np.int64)]

    # Users.
    home_city = rng.choice(n_cities, size=n_users, p=city_p)
    home_loc = random_loc_in(home_city)
    p_online = rng.beta(2.0, 16.0, size=n_users)
    p_travel = rng.beta(1.0, 24.0, size=n_users)
    hour = rng.uniform(6.0, 21.0, size=n_users)
    amount_shift = rng.normal(0.0, 0.3, size=n_users)
    activity = rng.lognormal(0.0, 0.5, size=n_users)

    # Merchants: a few online and chain merchants take much of the traffic; local ones
    # mostly sit in the cities where users live.
    names = np.unique(rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=n_merchants,
                                   dtype=np.int64, endpoint=True))
    while names.size < n_merchants:  # collisions are astronomically rare; top up deterministically
        names = np.unique(np.concatenate([names, rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max,
                                                              size=n_merchants - names.size, dtype=np.int64)]))
    names = rng.permutation(names)
    n_online = max(5, round(0.04 * n_merchants))
    n_chain = max(5, round(0.01 * n_merchants))
    kind = np.full(n_merchants, KIND_LOCAL, dtype=np.int8)
    kind[:n_online] = KIND_ONLINE
    kind[n_online:n_online + n_chain] = KIND_CHAIN
    kind = rng.permutation(kind)
    merchant_loc = np.full(n_merchants, ONLINE_LOC, dtype=np.int64)
    local_ids = np.flatnonzero(kind == KIND_LOCAL)
    near_users = rng.random(local_ids.size) < 0.85
    city = np.where(near_users, home_city[rng.integers(0, n_users, size=local_ids.size)],
                    rng.choice(n_cities, size=local_ids.size, p=city_p))
    merchant_loc[local_ids] = random_loc_in(city)
    abroad = rng.random(local_ids.size) < _FOREIGN_LOCAL_SHARE
    merchant_loc[local_ids[abroad]] = n_us_locs + rng.integers(0, len(_FOREIGN), size=int(abroad.sum()))
    mcc = (np.searchsorted(_zipf_cum(len(MCCS), 1.1), rng.random(n_merchants))).astype(np.int16)
    mcc_mu = np.log(40.0) + np.random.default_rng(_GEO_SEED).normal(0.0, 0.6, size=len(MCCS))
    us_local = local_ids[~abroad]
    us_local = us_local[np.argsort(city_of_loc[merchant_loc[us_local]], kind="stable")]
    city_local_start = np.searchsorted(city_of_loc[merchant_loc[us_local]], np.arange(n_cities + 1))
    online_ids = rng.permutation(np.flatnonzero(kind == KIND_ONLINE))
    chain_ids = rng.permutation(np.flatnonzero(kind == KIND_CHAIN))

    # Cards: each user has 1-9; the first opens when the user arrives, later ones after it;
    # some close before the end of the file.
    n_cards = 1 + rng.choice(len(_CARDS_PER_USER_P), size=n_users, p=_CARDS_PER_USER_P)
    card_start = np.concatenate([[0], np.cumsum(n_cards)])
    card_user = np.repeat(np.arange(n_users), n_cards)
    card_local = np.arange(card_user.size) - card_start[card_user]
    years, _, _ = _calendar()
    target = _target_rows_per_day(years)
    early = rng.random(n_users) < 0.3  # customers already there when the file starts
    arrive_p = target[: N_DAYS - 365] / target[: N_DAYS - 365].sum()
    user_arrive = np.where(early, rng.integers(0, 730, size=n_users), rng.choice(N_DAYS - 365, size=n_users, p=arrive_p))
    arrive = user_arrive[card_user]
    card_open = np.where(card_local == 0, arrive,
                         arrive + (rng.random(card_user.size) * (N_DAYS - 180 - arrive)).astype(np.int64))
    card_open = np.minimum(card_open, N_DAYS - 1)
    closes = (rng.random(card_user.size) < 0.2) & (card_open < N_DAYS - 400)
    close_at = card_open + 365 + (rng.random(card_user.size) * (N_DAYS - 365 - card_open)).astype(np.int64)
    card_close = np.where(closes, np.minimum(close_at, N_DAYS - 1), N_DAYS - 1)
    card_activity = activity[card_user] * rng.gamma(3.0, 1.0, size=card_user.size)

    # Day weights per card g = target / active activity: the sum over cards then follows `target`.
    delta = np.zeros(N_DAYS + 1)
    np.add.at(delta, card_open, card_activity)
    np.add.at(delta, card_close + 1, -card_activity)
    active = np.cumsum(delta)[:N_DAYS]
    g = np.where(active > 1e-12, target / np.maximum(active, 1e-12), 0.0)
    cum_g = np.cumsum(g)
    card_mass = card_activity * (cum_g[card_close] - np.where(card_open > 0, cum_g[card_open - 1], 0.0))
    card_rows = _allocate(n_rows, card_mass, card_local)

    world = _World(
        loc_text=loc_text, city_of_loc=city_of_loc, merchant_name=names, merchant_kind=kind,
        merchant_loc=merchant_loc, merchant_mcc=mcc, mcc_mu=mcc_mu,
        online_ids=online_ids, online_cum=_zipf_cum(online_ids.size, 0.8),
        chain_ids=chain_ids, chain_cum=_zipf_cum(chain_ids.size, 0.8),
        local_ids=local_ids, city_local_start=city_local_start, city_local_ids=us_local,
        user_home_city=home_city, user_home_loc=home_loc, user_p_online=p_online,
        user_p_travel=p_travel, user_hour=hour, user_amount_shift=amount_shift,
        user_card_start=card_start, card_user=card_user, card_local=card_local,
        card_open=card_open, card_close=card_close, card_rows=card_rows, cum_g=cum_g,
        target=target, seed=seed, n_us_locs=n_us_locs, loc_state=loc_state, user_home_state=loc_state[home_loc],
        planted={}, planted_start=np.zeros(card_user.size + 1, dtype=np.int64), stats={},
    )
    _plan(world, n_rows, seed, regime)
    return world


def _allocate(n_rows: int, mass: np.ndarray, card_local: np.ndarray) -> np.ndarray:
    """Integer rows per card summing to n_rows: one per card while rows last, the rest by largest remainder."""
    rows = np.zeros(mass.size, dtype=np.int64)
    # Users' first cards get their row first, so even tiny files show every user.
    base = np.argsort(card_local != 0, kind="stable")[: min(n_rows, mass.size)]
    rows[base] = 1
    rest = n_rows - base.size
    if rest:
        share = mass / mass.sum() * rest
        rows += np.floor(share).astype(np.int64)
        left = rest - int(np.floor(share).sum())
        rows[np.argsort(-(share - np.floor(share)), kind="stable")[:left]] += 1
    return rows


# ---------------------------------------------------------------- fraud plan and look-alikes


class _Planter:
    """Collects the planted rows (fraud and legitimate look-alikes) and tracks how many rows
    each card can still give up: fraud at most half of a card's rows, look-alikes a quarter."""

    def __init__(self, world: _World, rng: np.random.Generator):
        self.w, self.rng = world, rng
        self.capacity = world.card_rows // 2  # fraud never takes over a card
        self.la_capacity = world.card_rows // 4  # nor do look-alikes (together < all rows)
        self.used = np.zeros(world.merchant_name.size, dtype=bool)
        self.rows: list[dict[str, np.ndarray]] = []
        # Fraud infrastructure hides among ordinary merchants (where they are says nothing).
        self.fresh_online = world.online_ids
        self.fresh_any = np.flatnonzero(world.merchant_kind != KIND_CHAIN)
        self.fresh_local = world.local_ids
        # Local merchants by city (US cities first, then the foreign ones): travel destinations.
        city = world.city_of_loc[world.merchant_loc[world.local_ids]]
        order = np.argsort(city, kind="stable")
        self.by_city = world.local_ids[order]
        self.by_city_city = city[order]
        self.city_start = np.searchsorted(self.by_city_city, np.arange(world.city_of_loc.max() + 2))
        self.n_us_sorted = int(np.searchsorted(self.by_city_city, world.city_of_loc[world.n_us_locs]))

    def victims(self, k: int, first: int, last: int, need: int, cap: np.ndarray | None = None,
                weight: np.ndarray | None = None) -> np.ndarray:
        """Up to k cards active over [first, last] with room for `need` planted rows; any card alike
        (or by ``weight``), so a card's id says little about its risk."""
        w = self.w
        cap = self.capacity if cap is None else cap
        ok = np.flatnonzero((w.card_open <= first) & (w.card_close >= last) & (cap >= need))
        if weight is None:
            return self.rng.choice(ok, size=min(k, ok.size), replace=False)
        p = weight[ok] / weight[ok].sum() if ok.size else None
        return self.rng.choice(ok, size=min(k, ok.size), replace=False, p=p)

    def pick_cards(self, first: np.ndarray, last: np.ndarray, need: int, cap: np.ndarray,
                   days_from: tuple[int, int] | None = None, weight: np.ndarray | None = None) -> np.ndarray:
        """One card per request, uniformly (or by ``weight``) among the cards active over
        [first[i], last[i]] with room for ``need`` rows in ``cap`` (vectorised rejection sampling;
        -1 where none was found).
        With ``days_from=(lo, hi)``, requests still without a card after a while move to another
        day in [lo, hi] drawn like activity (``first``/``last`` are updated in place)."""
        w, rng = self.w, self.rng
        n_cards = w.card_user.size
        card = np.full(first.size, -1, dtype=np.int64)
        room = cap.copy()
        todo = np.arange(first.size)
        cum_weight = None if weight is None else np.cumsum(weight)
        for attempt in range(60):
            if todo.size == 0:
                break
            if days_from is not None and attempt and attempt % 10 == 0:
                lo, hi = days_from
                p = w.target[lo:hi + 1]
                moved = lo + rng.choice(p.size, size=todo.size, p=p / p.sum())
                last[todo] = moved + (last[todo] - first[todo])
                first[todo] = moved
            if weight is None:
                cand = rng.integers(0, n_cards, size=todo.size)
            else:
                cand = np.minimum(np.searchsorted(cum_weight, rng.random(todo.size) * cum_weight[-1]), n_cards - 1)
            good = ((w.card_open[cand] <= first[todo]) & (w.card_close[cand] >= last[todo])
                    & (room[cand] >= need))
            idx, c = todo[good], cand[good]
            order = np.argsort(c, kind="stable")
            idx, c = idx[order], c[order]
            rank = np.arange(c.size) - np.searchsorted(c, c)  # earlier picks of the same card
            fits = (rank + 1) * need <= room[c]
            card[idx[fits]] = c[fits]
            np.subtract.at(room, c[fits], need)
            todo = np.flatnonzero(card < 0)
        return card

    def fresh(self, pool: np.ndarray, k: int, mcc: int | None) -> np.ndarray:
        """k merchants never used by another campaign or look-alike (so their ids carry no history);
        a share INFRA_MCC_SHARE of them trade under the infrastructure category ``mcc``."""
        if k <= 0:
            return np.zeros(0, dtype=np.int64)
        free = pool[~self.used[pool]]
        if free.size < k:
            free = pool
        chosen = self.rng.choice(free, size=min(k, free.size), replace=False)
        self.used[chosen] = True
        if mcc is not None:
            marked = chosen[self.rng.random(chosen.size) < INFRA_MCC_SHARE]
            self.w.merchant_mcc[marked] = MCCS.index(mcc)
        return chosen

    def random_merchants(self, n: int) -> np.ndarray:
        """Merchants as a shopper would pick them (popular ones often), so they look like any purchase."""
        w, rng = self.w, self.rng
        r = rng.random(n)
        online = w.online_ids[np.searchsorted(w.online_cum, rng.random(n))]
        chain = w.chain_ids[np.searchsorted(w.chain_cum, rng.random(n))]
        local = w.local_ids[rng.integers(0, w.local_ids.size, size=n)]
        return np.where(r < 0.2, online, np.where(r < 0.65, chain, local))

    def add(self, card, day, merchant, cents, fraud: bool, loc: np.ndarray | None = None,
            room: np.ndarray | None = None, odd_hours: bool = True) -> None:
        """Plant rows; in-person chain rows happen at the card holder's home unless ``loc`` says where.
        The rows count against ``room`` (default: the fraud or the look-alike capacity). Half of
        the fraud rows happen at any hour unless ``odd_hours`` is False (then at the holder's)."""
        w, rng = self.w, self.rng
        n = card.size
        if n == 0:
            return
        day = np.minimum(day, w.card_close[card])
        if loc is None:
            loc = w.merchant_loc[merchant].copy()
            chain = w.merchant_kind[merchant] == KIND_CHAIN
            loc[chain] = w.user_home_loc[w.card_user[card[chain]]]
        online = w.merchant_kind[merchant] == KIND_ONLINE
        chip = _chip_for(rng, day, online, chip_factor=0.9 if fraud else 1.0)  # cloned cards: a little more swipe
        hour = np.where(rng.random(n) < (0.5 if fraud and odd_hours else 0.0), rng.integers(0, 24, size=n),
                        _hours(rng, w.user_hour[w.card_user[card]]))
        err = _errors(rng, n, fraud)
        self.rows.append(dict(card=card.astype(np.int64), day=day.astype(np.int64),
                              minute=(hour * 60 + rng.integers(0, 60, size=n)).astype(np.int64),
                              merchant=merchant.astype(np.int64), loc=loc.astype(np.int64),
                              cents=cents.astype(np.int64), chip=chip,
                              err=err, fraud=np.full(n, fraud)))
        if room is None:
            room = self.capacity if fraud else self.la_capacity
        np.subtract.at(room, card, 1)

    def amounts(self, merchant: np.ndarray, card: np.ndarray, scale: float) -> np.ndarray:
        w = self.w
        mu = w.mcc_mu[w.merchant_mcc[merchant]] + w.user_amount_shift[w.card_user[card]] + np.log(scale)
        return np.maximum(1, np.round(np.exp(self.rng.normal(mu, 0.9)) * 100)).astype(np.int64)

    def days_like_activity(self, n: int, first: int, last: int) -> np.ndarray:
        p = self.w.target[first:last + 1]
        return first + self.rng.choice(p.size, size=n, p=p / p.sum())


def _plan(world: _World, n_rows: int, seed: int, regime: str) -> None:
    """Plant the look-alikes (the same for every regime), then the regime's fraud."""
    total = round(FRAUD_RATE * n_rows)
    lookalikes = _Planter(world, np.random.default_rng([seed, 2]))
    world.stats.update(_plan_lookalikes(lookalikes, total))
    fraud = _Planter(world, np.random.default_rng([seed, 3, REGIMES.index(regime)]))
    fraud.used = lookalikes.used  # infrastructure stays apart from promoted merchants
    _plan_fraud(fraud, n_rows, total, regime)
    rows = lookalikes.rows + fraud.rows
    cols = ("card", "day", "minute", "merchant", "loc", "cents", "chip", "err", "fraud")
    if rows:
        planted = {c: np.concatenate([r[c] for r in rows]) for c in cols}
    else:
        planted = {c: np.zeros(0, dtype=bool if c == "fraud" else np.int64) for c in cols}
    order = np.argsort(planted["card"], kind="stable")
    world.planted = {c: v[order] for c, v in planted.items()}
    world.planted_start = np.searchsorted(world.planted["card"], np.arange(world.card_user.size + 1))


# -------------------------------- look-alikes: legitimate crowding and bursts


def _plan_lookalikes(p: _Planter, total_fraud: int) -> dict[str, np.ndarray]:
    """Legitimate events that crowd like fraud does, as many as the fraud plan's campaigns or more:
    promotions and store openings (many cards new to one merchant within a week), trips (a card
    hits several new merchants in another city within days) and events (a group of cards in one
    city for a few days, sharing a few merchants)."""
    campaigns = total_fraud / ROWS_PER_CAMPAIGN
    n_promotions = max(2, round(PROMOTIONS_PER_CAMPAIGN * campaigns))
    n_events = max(1, round(EVENTS_PER_CAMPAIGN * campaigns))
    n_trips = max(4, round(TRIPS_PER_FRAUD_ROW * total_fraud))
    last = N_DAYS - 1
    promotions = np.sort(p.days_like_activity(n_promotions, 0, last - 7))
    events = np.sort(p.days_like_activity(n_events, 0, last - 4))
    for t0 in promotions.tolist():
        _promotion(p, t0)
    for t0 in events.tolist():
        _event(p, t0)
    return dict(promotion=promotions, event=events, trip=_trips(p, n_trips))


def _promotion(p: _Planter, t0: int) -> None:
    """A sale or an opening: 10-60 cards visit one legitimate merchant for the first time within a
    week (mostly from the merchant's state); about a third come back in the following months."""
    w, rng = p.w, p.rng
    r = rng.random()
    if r < 0.5:  # a store opening: a merchant no campaign will use
        merchant = p.fresh(p.fresh_local, 1, None)
    elif r < 0.8:  # a sale at a local shop
        merchant = p.fresh(w.local_ids, 1, None)
    else:  # an online sale or launch; some are digital goods, like card-testing merchants
        merchant = p.fresh(w.online_ids, 1, None)
        if rng.random() < 0.3:
            w.merchant_mcc[merchant] = MCCS.index(TESTER_MCC)
    weight = None
    if w.merchant_kind[merchant[0]] != KIND_ONLINE:
        weight = np.where(w.user_home_state[w.card_user] == w.loc_state[w.merchant_loc[merchant[0]]], 20.0, 1.0)
    want = 10 + int(rng.integers(0, 51))
    eligible = int(((w.card_open <= t0) & (w.card_close >= t0 + 6) & (p.la_capacity >= 1)).sum())
    cards = p.victims(min(want, max(1, int(0.3 * eligible))), t0, t0 + 6, 1, p.la_capacity, weight)
    if cards.size == 0:
        return
    back = np.where(rng.random(cards.size) < 0.35, 1 + rng.integers(0, 3, size=cards.size), 0)
    back = np.minimum(back, p.la_capacity[cards] - 1)
    first_day = t0 + rng.integers(0, 7, size=cards.size)
    card = np.concatenate([cards, np.repeat(cards, back)])
    day = np.concatenate([first_day, np.repeat(first_day, back) + 7 + rng.integers(0, 110, size=int(back.sum()))])
    day = np.minimum(day, N_DAYS - 1)
    merchant = np.repeat(merchant, card.size)
    p.add(card, day, merchant, p.amounts(merchant, card, 0.9), fraud=False)


def _event(p: _Planter, t0: int) -> None:
    """A convention or a festival: 8-30 cards from anywhere spend 2-4 days in one city, most rows
    at the same 3-6 merchants (hotel, venue, restaurants) that are new to them."""
    w, rng = p.w, p.rng
    if p.n_us_sorted == 0:
        return
    for _ in range(5):
        anchor = int(rng.integers(0, p.n_us_sorted))
        city = p.by_city_city[anchor]
        lo, hi = p.city_start[city], p.city_start[city + 1]
        if hi - lo >= 4:
            break
    pool = p.by_city[lo:hi]
    span = 2 + int(rng.integers(0, 3))
    cards = p.victims(8 + int(rng.integers(0, 23)), t0, t0 + span - 1, 5, p.la_capacity)
    if cards.size == 0:
        return
    shared = rng.choice(pool, size=min(pool.size, 3 + int(rng.integers(0, 4))), replace=False)
    per_card = 2 + rng.integers(0, 4, size=cards.size)
    card = np.repeat(cards, per_card)
    merchant = np.where(rng.random(card.size) < 0.8, shared[rng.integers(0, shared.size, size=card.size)],
                        pool[rng.integers(0, pool.size, size=card.size)])
    merchant[np.cumsum(per_card) - per_card] = shared[0]  # everyone checks in at the venue
    day = t0 + rng.integers(0, span, size=card.size)
    p.add(card, day, merchant, p.amounts(merchant, card, 1.0), fraud=False)


def _trips(p: _Planter, n: int) -> np.ndarray:
    """Trips (vectorised, they are many): a card hits 3-8 merchants new to it within 1-3 days in
    another city, a quarter of them abroad, amounts as usual for the merchants' categories;
    some trips abroad change money at a bureau (quasi-cash, like cash-out merchants)."""
    w, rng = p.w, p.rng
    if p.n_us_sorted == 0:
        return np.zeros(0, dtype=np.int64)
    span = 1 + rng.integers(0, 3, size=n)
    first = p.days_like_activity(n, 0, N_DAYS - 3)
    last = first + span - 1
    card = p.pick_cards(first, last, 8, p.la_capacity, days_from=(0, N_DAYS - 3))
    ok = card >= 0
    card, first, span = card[ok], first[ok], span[ok]
    n = card.size
    n_foreign = p.by_city.size - p.n_us_sorted
    abroad = (rng.random(n) < 0.25) & (n_foreign > 0)
    anchor = np.where(abroad, p.n_us_sorted + rng.integers(0, max(n_foreign, 1), size=n),
                      rng.integers(0, p.n_us_sorted, size=n))
    home = ~abroad & (p.by_city_city[anchor] == w.user_home_city[w.card_user[card]])
    anchor[home] = rng.integers(0, p.n_us_sorted, size=int(home.sum()))  # one more try to leave home
    city = p.by_city_city[anchor]
    start, size = p.city_start[city], p.city_start[city + 1] - p.city_start[city]
    k = 3 + rng.integers(0, 6, size=n)
    trip = np.repeat(np.arange(n), k)
    j = np.arange(trip.size) - np.repeat(np.cumsum(k) - k, k)
    # The city's merchants from the anchor on (distinct while the city has enough), then chains.
    own = j < size[trip]
    pos = start[trip] + (anchor[trip] - start[trip] + j) % size[trip]
    chain = w.chain_ids[np.searchsorted(w.chain_cum, rng.random(trip.size))]
    merchant = np.where(own, p.by_city[pos], chain)
    loc = w.merchant_loc[p.by_city[anchor]][trip]
    exchange = abroad & (rng.random(n) < 0.3)
    w.merchant_mcc[p.by_city[anchor[exchange]]] = MCCS.index(MULE_MCC)
    day = first[trip] + (rng.random(trip.size) * span[trip]).astype(np.int64)
    tcard = card[trip]
    p.add(tcard, day, merchant, p.amounts(merchant, tcard, 1.0), fraud=False, loc=loc)
    return first


# -------------------------------- fraud


def _mechanism_mix(year: int) -> np.ndarray:
    """Probabilities of (compromised merchant, fraud ring, card testing) for a campaign in ``year``:
    card testing grows after 2012, rings shrink a little."""
    testing = float(np.interp(year, [1991, 2008, 2012, 2019], [0.10, 0.12, 0.20, 0.45]))
    ring = float(np.interp(year, [1991, 2019], [0.45, 0.30]))
    return np.array([1.0 - testing - ring, ring, testing])


def _online_share(year: int) -> float:
    """Share of rings' mules and of cash-out merchants that are online: in person early, online later."""
    return float(np.interp(year, [1995, 2019], [0.1, 0.8]))


def _plan_fraud(p: _Planter, n_rows: int, total: int, regime: str) -> None:
    """Plan fraud per period until each period's budget is spent: campaigns of the regime's
    mechanisms (the default mixes them by year), or lone rows for ``row_only``."""
    w, rng = p.w, p.rng
    periods = [(_day_index(a), _day_index(b)) for a, b in FRAUD_PERIODS]
    mass = np.array([w.target[a:b + 1].sum() for a, b in periods])
    campaigns: dict[str, list[int]] = {name: [] for name in _MECHANISMS}
    year_start = np.searchsorted(_YEAR_OF_DAY, np.arange(1991, 2022))
    for (first, last), share in zip(periods, mass / mass.sum()):
        budget = max(round(total * share), min(FRAUD_FLOOR_PER_PERIOD, n_rows // 300))
        if regime == "row_only":
            _lone_rows(p, first, last, budget)
            continue
        failures = 0
        while budget > 0 and failures < 50:
            year = int(_YEAR_OF_DAY[p.days_like_activity(1, first, last)[0]])
            if regime == "default":
                name = _MECHANISM_NAMES[rng.choice(3, p=_mechanism_mix(year))]
            else:
                name = regime
            campaign, span = _MECHANISMS[name]
            lo, hi = max(first, year_start[year - 1991]), min(last - span, year_start[year - 1990] - 1)
            if hi < lo:
                lo, hi = first, max(first, last - span)
            t0 = int(p.days_like_activity(1, lo, hi)[0])
            got = campaign(p, rng, t0, last, budget, year)
            budget -= got
            failures = failures + 1 if got == 0 else 0
            if got:
                campaigns[name].append(t0)
    w.stats.update({name: np.array(days, dtype=np.int64) for name, days in campaigns.items()})


def _lone_rows(p: _Planter, first: int, last: int, budget: int) -> None:
    """The row-only control: each fraud row alone on a card, at a merchant the card's holder would
    pick anyway (their own online/chain/favourite/travel mix): no shared merchants, no bursts, no
    campaigns; only the rows' own features differ. The (card, day) of a fraud row is drawn as any
    of the card's own rows is (day by activity, card by its rows per unit of activity), so a
    fraud row is as likely on a busy card as any other row is, at the holder's usual hours: the
    card's history (counts, time since its last row) says nothing about it. What differs is in
    the row's own columns (chip, errors), which the row-only baseline sees."""
    w = p.w
    day = p.days_like_activity(budget, first, last)
    span = w.cum_g[w.card_close] - np.where(w.card_open > 0, w.cum_g[w.card_open - 1], 0.0)
    rate = np.where(span > 0, w.card_rows / np.maximum(span, 1e-12), 0.0)
    card = p.pick_cards(day, day.copy(), 1, p.capacity, days_from=(first, last), weight=rate)
    ok = card >= 0
    card, day = card[ok], day[ok]
    merchant = np.empty(card.size, dtype=np.int64)
    loc = np.empty(card.size, dtype=np.int64)
    user = w.card_user[card]
    for u in np.unique(user):
        mine = np.flatnonzero(user == u)
        merchant[mine], loc[mine], _ = _shop(w, p.rng, int(u), day[mine], _favourites(w, int(u)))
    p.add(card, day, merchant, p.amounts(merchant, card, 1.0), fraud=True, loc=loc, odd_hours=False)


def _keep_budget(day: np.ndarray, budget: int) -> np.ndarray:
    """Indices of the earliest `budget` rows: a campaign cut short by the budget keeps its start."""
    return np.sort(np.argsort(day, kind="stable")[:budget])


def _fraud_at_hubs(p: _Planter, rng, card, day, hubs, hub_share: float, budget) -> int:
    """Fraud of ``card`` on ``day``: at one of ``hubs`` with probability ``hub_share``, else at a
    random merchant; as many rows as the budget allows. Returns the rows planted."""
    merchant = np.where(rng.random(card.size) < hub_share, hubs[rng.integers(0, hubs.size, size=card.size)],
                        p.random_merchants(card.size))
    keep = _keep_budget(day, budget)
    p.add(card[keep], day[keep], merchant[keep], p.amounts(merchant[keep], card[keep], 1.0), fraud=True)
    return keep.size


def _hubs(p: _Planter, rng, k: int, year: int) -> np.ndarray:
    """k fresh infrastructure merchants (mules, cash-out): in person early, online later."""
    n_online = int((rng.random(k) < _online_share(year)).sum())
    return np.concatenate([p.fresh(p.fresh_online, n_online, MULE_MCC),
                           p.fresh(p.fresh_local, k - n_online, MULE_MCC)])


def _ring(p: _Planter, rng, t0, last, budget, year) -> int:
    """Fraud ring: a group of stolen cards hits the same few mule merchants within days."""
    per_card = 2 + rng.poisson(3.0, size=5 + rng.poisson(8.0))
    cards = p.victims(per_card.size, t0, min(t0 + 5, last), need=2)
    if cards.size == 0:
        return 0
    per_card = np.minimum(per_card[: cards.size], p.capacity[cards])
    mules = _hubs(p, rng, 3 + int(rng.integers(0, 3)), year)
    card = np.repeat(cards, per_card)
    day = np.minimum(t0 + rng.integers(0, 1 + int(rng.integers(1, 5)), size=card.size), last)
    return _fraud_at_hubs(p, rng, card, day, mules, 0.85, budget)


def _breach(p: _Planter, rng, t0, last, budget, year) -> int:
    """Compromised merchant: cards that shopped there in a window see fraud weeks later,
    much of it at the same few cash-out merchants."""
    span = 80
    per_card = 1 + rng.poisson(4.0, size=5 + rng.poisson(10.0))
    cards = p.victims(per_card.size, t0, min(t0 + span, last), need=2)
    if cards.size == 0:
        return 0
    per_card = np.minimum(per_card[: cards.size], p.capacity[cards] - 1)
    keep_cards = per_card > 0
    cards, per_card = cards[keep_cards], per_card[keep_cards]
    if cards.size == 0:
        return 0
    breached = p.fresh_local[rng.integers(0, p.fresh_local.size, size=1)]  # an ordinary shop
    visit_day = t0 + rng.integers(0, 14, size=cards.size)
    visit_merchant = np.repeat(breached, cards.size)
    p.add(cards, visit_day, visit_merchant, p.amounts(visit_merchant, cards, 1.0), fraud=False, room=p.capacity)
    cash_out = _hubs(p, rng, 3 + int(rng.integers(0, 4)), year)
    burst = t0 + 14 + rng.integers(3, 60, size=cards.size)
    card = np.repeat(cards, per_card)
    day = np.minimum(np.repeat(burst, per_card) + rng.integers(0, 3, size=card.size), last)
    return _fraud_at_hubs(p, rng, card, day, cash_out, 0.7, budget)


def _card_testing(p: _Planter, rng, t0, last, budget, year) -> int:
    """Card testing: small online charges at a few testing merchants, then large fraud elsewhere."""
    n_tests = 1 + rng.integers(0, 3, size=6 + rng.poisson(12.0))
    n_large = 1 + rng.poisson(2.0, size=n_tests.size)
    cards = p.victims(n_tests.size, t0, min(t0 + 10, last), need=2)
    if cards.size == 0:
        return 0
    room = p.capacity[cards]
    n_tests = np.minimum(n_tests[: cards.size], np.maximum(room - 1, 1))
    n_large = np.clip(room - n_tests, 0, n_large[: cards.size])
    testers = p.fresh(p.fresh_online, 2 + int(rng.integers(0, 2)), TESTER_MCC)
    test_day = t0 + rng.integers(0, 5, size=cards.size)
    t_card = np.repeat(cards, n_tests)
    t_day = np.minimum(np.repeat(test_day, n_tests), last)
    t_merchant = testers[rng.integers(0, testers.size, size=t_card.size)]
    t_cents = rng.integers(50, 1000, size=t_card.size)
    l_card = np.repeat(cards, n_large)
    l_day = np.minimum(np.repeat(test_day, n_large) + rng.integers(0, 4, size=l_card.size), last)
    l_merchant = p.random_merchants(l_card.size)
    card = np.concatenate([t_card, l_card])
    day = np.concatenate([t_day, l_day])
    merchant = np.concatenate([t_merchant, l_merchant])
    cents = np.concatenate([t_cents, p.amounts(l_merchant, l_card, 1.2)])
    keep = _keep_budget(day, budget)
    p.add(card[keep], day[keep], merchant[keep], cents[keep], fraud=True)
    return keep.size


_MECHANISMS = {"compromised_merchant": (_breach, 80), "fraud_ring": (_ring, 5), "card_testing": (_card_testing, 10)}
_MECHANISM_NAMES = tuple(_MECHANISMS)  # the order of _mechanism_mix


# ---------------------------------------------------------------- row features


def _hours(rng: np.random.Generator, center: np.ndarray) -> np.ndarray:
    """Each user shops around their own hour; 40% of rows follow the general daytime profile."""
    own = np.round(rng.normal(center, 1.5)).astype(np.int64) % 24
    general = np.clip(np.round(rng.normal(14.0, 4.0, size=center.size)), 0, 23).astype(np.int64)
    return np.where(rng.random(center.size) < 0.6, own, general)


_YEAR_OF_DAY = _calendar()[0]
_CHIP_SHARE_BY_YEAR = np.interp(np.arange(1991, 2021), [2012, 2015, 2017], [0.0, 0.5, 0.8])


def _chip_for(rng, day, online, chip_factor=1.0) -> np.ndarray:
    """Online rows say so; in person, chip readers spread from 2013 (EMV), else swipe."""
    share = _CHIP_SHARE_BY_YEAR[_YEAR_OF_DAY[day] - 1991] * chip_factor
    chip = np.where(rng.random(day.size) < share, CHIP, SWIPE).astype(np.int8)
    chip[online] = ONLINE
    return chip


_ERR_CODES_PLAIN = 1 + 2 * np.arange(len(_ERROR_SETS))  # code of each set without trailing comma
_ERR_P_NORMAL = np.array([s[1] for s in _ERROR_SETS]) / sum(s[1] for s in _ERROR_SETS)
_ERR_P_FRAUD = np.array([s[2] for s in _ERROR_SETS]) / sum(s[2] for s in _ERROR_SETS)


def _errors(rng: np.random.Generator, n: int, fraud: bool) -> np.ndarray:
    """Error code per row: 0 none, else a set in one of its two spellings (trailing comma or not)."""
    rate, p = (ERROR_RATE_FRAUD, _ERR_P_FRAUD) if fraud else (ERROR_RATE_NORMAL, _ERR_P_NORMAL)
    err = np.zeros(n, dtype=np.int16)
    hit = np.flatnonzero(rng.random(n) < rate)
    which = rng.choice(len(_ERROR_SETS), size=hit.size, p=p)
    err[hit] = _ERR_CODES_PLAIN[which] + (rng.random(hit.size) < 0.7)  # the real file mostly has the comma
    return err


def _error_texts() -> list[str]:
    texts = [""]
    for errors, _, _ in _ERROR_SETS:
        joined = ",".join(errors)
        texts.append(f'"{joined}"' if "," in joined else joined)
        texts.append(f'"{joined},"')
    return texts


# ---------------------------------------------------------------- streaming rows


def _favourites(w: _World, user: int) -> np.ndarray:
    """The user's local merchants in the order of their preference (their own random stream)."""
    city = w.user_home_city[user]
    pool = w.city_local_ids[w.city_local_start[city]:w.city_local_start[city + 1]]
    return np.random.default_rng([w.seed, 4, user]).permutation(pool)


def _shop(w: _World, rng: np.random.Generator, user: int, day: np.ndarray, favourites: np.ndarray):
    """Where ``user`` shops on ``day``: (merchant, location, online). Online grows over the years;
    in person it is a chain (at home), a local favourite, or (travelling) any local merchant anywhere."""
    n = day.size
    year_frac = (_YEAR_OF_DAY[day] - 1991) / 29.0
    r = rng.random(n)
    p_online = w.user_p_online[user] * (0.4 + 1.2 * year_frac)
    online = r < p_online
    travel = ~online & (r < p_online + w.user_p_travel[user])
    local = ~online & ~travel & (rng.random(n) < (0.75 if favourites.size else 0.0))
    chain = ~online & ~travel & ~local
    merchant = np.empty(n, dtype=np.int64)
    merchant[online] = w.online_ids[np.searchsorted(w.online_cum, rng.random(int(online.sum())))]
    merchant[chain] = w.chain_ids[np.searchsorted(w.chain_cum, rng.random(int(chain.sum())))]
    merchant[travel] = w.local_ids[rng.integers(0, w.local_ids.size, size=int(travel.sum()))]
    if favourites.size:
        pick = np.searchsorted(_zipf_cum(favourites.size, 1.0), rng.random(int(local.sum())))
        merchant[local] = favourites[pick]
    loc = w.merchant_loc[merchant]
    loc[chain] = w.user_home_loc[user]
    return merchant, loc, online


def _user_rows(world: _World, seed: int, user: int) -> dict[str, np.ndarray]:
    """All rows of one user, ordered by card then time, from the user's own random stream."""
    w = world
    rng = np.random.default_rng([seed, 1, user])
    c0, c1 = int(w.user_card_start[user]), int(w.user_card_start[user + 1])
    p0, p1 = int(w.planted_start[c0]), int(w.planted_start[c1])
    planted_n = np.diff(w.planted_start[c0:c1 + 1])
    n_norm = w.card_rows[c0:c1] - planted_n
    n = int(n_norm.sum())
    card = np.repeat(np.arange(c0, c1), n_norm)

    # Days: each card's rows follow the activity curve over its open period.
    lo = np.where(w.card_open[card] > 0, w.cum_g[w.card_open[card] - 1], 0.0)
    hi = w.cum_g[w.card_close[card]]
    day = np.searchsorted(w.cum_g, lo + rng.random(n) * (hi - lo))
    day = np.clip(day, w.card_open[card], w.card_close[card])
    minute = _hours(rng, np.full(n, w.user_hour[user])) * 60 + rng.integers(0, 60, size=n)

    merchant, loc, online = _shop(w, rng, user, day, _favourites(w, user))

    mu = w.mcc_mu[w.merchant_mcc[merchant]] + w.user_amount_shift[user]
    cents = np.maximum(1, np.round(np.exp(rng.normal(mu, 0.8)) * 100)).astype(np.int64)
    refund = rng.random(n) < REFUND_RATE  # refunds are whole dollars, as in the real file
    cents[refund] = -np.maximum(100, np.round(cents[refund] / 100) * 100)
    rows = dict(card=card, day=day, minute=minute, merchant=merchant, loc=loc, cents=cents,
                chip=_chip_for(rng, day, online), err=_errors(rng, n, fraud=False),
                fraud=np.zeros(n, dtype=bool))

    rows = {k: np.concatenate([v, w.planted[k][p0:p1]]) for k, v in rows.items()}
    key = (rows["card"] - c0) * (N_DAYS * MINUTES_PER_DAY) + rows["day"] * MINUTES_PER_DAY + rows["minute"]
    order = np.argsort(key, kind="stable")
    return {k: v[order] for k, v in rows.items()}


def _blocks(world: _World, seed: int, chunk_rows: int):
    """Yield rows in file order, in blocks of whole users of about chunk_rows rows."""
    pending: list[dict[str, np.ndarray]] = []
    size = 0
    n_users = world.user_card_start.size - 1
    for user in range(n_users):
        c0, c1 = world.user_card_start[user], world.user_card_start[user + 1]
        if world.card_rows[c0:c1].sum() == 0:
            continue
        rows = _user_rows(world, seed, user)
        pending.append(rows)
        size += rows["card"].size
        if size >= chunk_rows:
            yield _concat(pending)
            pending, size = [], 0
    if pending:
        yield _concat(pending)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------- text formatting


@dataclass
class _Tables:
    """Pre-formatted text pieces, each with its trailing separator; a row is their concatenation."""

    card: pa.Array  # "User,Card,"
    date: pa.Array  # "Year,Month,Day,"
    time: pa.Array  # "HH:MM,"
    sign: pa.Array  # "$" or "$-"
    cents: pa.Array  # ".CC,"
    chip: pa.Array  # "Swipe Transaction,"
    merchant: pa.Array  # "<int64>,"
    loc: pa.Array  # "City,State,Zip,"
    mcc: pa.Array  # "MCC,"
    tail: pa.Array  # "Errors?,Is Fraud?\n", index = 2 * error code + fraud


def _string_tables(world: _World) -> _Tables:
    years, months, dom = _calendar()
    minutes = np.arange(MINUTES_PER_DAY)
    return _Tables(
        card=pa.array([f"{u},{c}," for u, c in zip(world.card_user.tolist(), world.card_local.tolist())]),
        date=pa.array([f"{y},{m},{d}," for y, m, d in zip(years.tolist(), months.tolist(), dom.tolist())]),
        time=pa.array([f"{m // 60:02d}:{m % 60:02d}," for m in minutes.tolist()]),
        sign=pa.array(["$", "$-"]),
        cents=pa.array([f".{c:02d}," for c in range(100)]),
        chip=pa.array([f"{name}," for name in CHIP_NAMES]),
        merchant=pc.binary_join_element_wise(pc.cast(pa.array(world.merchant_name), pa.string()), ",", ""),
        loc=pa.array(world.loc_text),
        mcc=pa.array([f"{m}," for m in MCCS]),
        tail=pa.array([f"{e},{label}\n" for e in _error_texts() for label in ("No", "Yes")]),
    )


def _write_block(handle, rows: dict[str, np.ndarray], world: _World, t: _Tables) -> None:
    for start in range(0, rows["card"].size, _FORMAT_ROWS):
        part = {k: v[start:start + _FORMAT_ROWS] for k, v in rows.items()}
        cents = part["cents"]
        dollars, rest = np.divmod(np.abs(cents), 100)
        pieces = [
            t.card.take(pa.array(part["card"])),
            t.date.take(pa.array(part["day"])),
            t.time.take(pa.array(part["minute"] % MINUTES_PER_DAY)),
            t.sign.take(pa.array((cents < 0).astype(np.int8))),
            pc.cast(pa.array(dollars), pa.string()),
            t.cents.take(pa.array(rest)),
            t.chip.take(pa.array(part["chip"])),
            t.merchant.take(pa.array(part["merchant"])),
            t.loc.take(pa.array(part["loc"])),
            t.mcc.take(pa.array(world.merchant_mcc[part["merchant"]])),
            t.tail.take(pa.array(part["err"].astype(np.int32) * 2 + part["fraud"])),
        ]
        lines = pc.binary_join_element_wise(*pieces, "")
        offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32, count=len(lines) + 1, offset=lines.offset * 4)
        handle.write(memoryview(lines.buffers()[2])[offsets[0]:offsets[-1]])


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fraudlib.synthetic",
        description="Write synthetic credit-card transactions in exactly the IBM TabFormer "
                    "card_transaction.v1.csv format (see docs/synthetic_data.md). The real file has "
                    f"{ROWS_FULL:,} rows; smaller files scale its marginals down.",
        epilog="example: python -m fraudlib.synthetic --rows 2000000 --out runs/data/card_transaction.v1.csv; "
               "100M rows as 16 files: --rows 100000000 --files 16 --out data/tabformer-100m",
    )
    parser.add_argument("--rows", type=int, required=True, help="number of transaction rows to write")
    parser.add_argument("--out", type=Path, required=True, help="output CSV path (written atomically)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed and rows give the same bytes (default 0)")
    parser.add_argument("--chunk-rows", type=int, default=1_000_000,
                        help="rows generated per block; bounds memory, not the output (default 1000000)")
    parser.add_argument("--regime", choices=REGIMES, default="default",
                        help="which fraud the file holds: all mechanisms (default), one of them alone, "
                             "or row_only, fraud rows without graph structure (a control)")
    parser.add_argument("--files", type=int, default=1,
                        help="write the rows as this many files of equal row counts, part-0000.csv, ..., "
                             "into the folder --out (read them as '<out>/part-*.csv'); default 1: --out is the file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    try:
        summary = generate(args.out, args.rows, seed=args.seed, chunk_rows=args.chunk_rows,
                           progress=not args.quiet, regime=args.regime, files=args.files)
    except (ValueError, OSError) as exc:
        parser.exit(2, f"error: {exc}\n")
    where = summary.path if len(summary.files) == 1 else f"{len(summary.files)} files {summary.path / 'part-*.csv'}"
    print(f"wrote {where}: {summary.rows:,} rows, {summary.users:,} users, {summary.cards:,} cards, "
          f"{summary.merchants:,} merchants, {summary.frauds:,} frauds ({summary.frauds / summary.rows:.3%}) "
          f"in {summary.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
