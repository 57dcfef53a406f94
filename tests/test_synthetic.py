"""The synthetic generator: exactly the TabFormer format, deterministic, scaled marginals,
fraud that lives in the card/merchant graph, and atomic output."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from fraudlib import synthetic
from fraudlib.tabformer import read_transactions

HEADER = ("User,Card,Year,Month,Day,Time,Amount,Use Chip,Merchant Name,Merchant City,"
          "Merchant State,Zip,MCC,Errors?,Is Fraud?")
ROW = re.compile(
    r"\d+,[0-8],(199\d|20[01]\d|2020),([1-9]|1[0-2]),([1-9]|[12]\d|3[01]),([01]\d|2[0-3]):[0-5]\d,"
    r"\$-?\d+\.\d\d,(Swipe Transaction|Chip Transaction|Online Transaction),-?\d{1,19},"
    r"[^,\"]+,[^,\"]*,(\d{3,5}\.0)?,\d{4},(|[A-Za-z ]+|\"[A-Za-z ,]+\"),(Yes|No)"
)
ROWS = 20_000


def _strings(path: Path) -> pd.DataFrame:
    """The file as text, column by column (empty fields stay empty strings)."""
    options = pacsv.ConvertOptions(column_types={name: pa.string() for name in HEADER.split(",")})
    return pacsv.read_csv(path, convert_options=options).to_pandas()


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, synthetic.SyntheticSummary]:
    path = tmp_path_factory.mktemp("synthetic") / "card_transaction.v1.csv"
    return path, synthetic.generate(path, ROWS, seed=7)


@pytest.fixture(scope="module")
def text(generated) -> pd.DataFrame:
    return _strings(generated[0])


# ---------------------------------------------------------------- format


def test_header_and_every_row_have_the_tabformer_layout(generated):
    lines = generated[0].read_text().splitlines()

    assert lines[0] == HEADER
    assert len(lines) == ROWS + 1
    bad = [line for line in lines[1:] if not ROW.fullmatch(line)]
    assert bad == []


def test_each_quirk_of_the_real_file_appears(text):
    amount, errors = text["Amount"], text["Errors?"]
    assert amount.str.fullmatch(r"\$\d+\.\d\d").any()
    assert amount.str.fullmatch(r"\$-\d+\.00").any()  # refunds: negative whole dollars
    assert text["Zip"].str.fullmatch(r"\d{5}\.0").any()  # zip as float text
    assert text["Time"].str.fullmatch(r"\d\d:\d\d").all()
    assert (errors == "").mean() > 0.95
    assert errors.isin(synthetic.ERROR_VALUES).any()  # one value, no trailing comma
    with_comma = errors[errors.str.endswith(",")]
    assert not with_comma.empty  # "Bad PIN," in the file: a quoted list with a trailing comma
    listed = errors.str.strip(",").str.contains(",")
    assert (listed & ~errors.str.endswith(",")).any() and (listed & errors.str.endswith(",")).any()
    assert set(text["Use Chip"]) == set(synthetic.CHIP_NAMES)
    assert set(text["Is Fraud?"]) == {"Yes", "No"}


def test_errors_hold_only_tabformer_error_values(text):
    values = {v for cell in text["Errors?"] if cell for v in cell.split(",") if v}
    assert values <= set(synthetic.ERROR_VALUES)


def test_online_rows_have_city_online_and_no_state_or_zip(text):
    online = text[text["Use Chip"] == "Online Transaction"]

    assert len(online) > 0
    assert (online["Merchant City"] == "ONLINE").all()
    assert (online["Merchant State"] == "").all() and (online["Zip"] == "").all()
    assert (text.loc[text["Merchant City"] == "ONLINE", "Use Chip"] == "Online Transaction").all()


def test_merchant_names_round_trip_as_int64_over_the_full_range(generated, text):
    options = pacsv.ConvertOptions(column_types={"Merchant Name": pa.int64()})
    names = pacsv.read_csv(generated[0], convert_options=options).column("Merchant Name").to_numpy()

    assert [str(v) for v in names] == text["Merchant Name"].tolist()
    assert names.min() < -(2**62) and names.max() > 2**62
    per_merchant = pd.DataFrame({"name": names, "mcc": text["MCC"]}).groupby("name")["mcc"].nunique()
    assert (per_merchant == 1).all()  # a merchant keeps its category


def test_the_project_reader_accepts_the_file(generated):
    frame = read_transactions(generated[0])

    assert len(frame) == ROWS
    assert frame["Is Fraud?"].sum() == generated[1].frauds


def test_rows_are_ordered_by_user_card_then_time(generated):
    frame = read_transactions(generated[0])
    day = pd.to_datetime(frame[["Year", "Month", "Day"]]).to_numpy().astype("datetime64[D]").astype(np.int64)
    key = np.lexsort((day * 1440 + frame["Time"].to_numpy(), frame["Card"], frame["User"]))

    assert (key == np.arange(len(frame))).all()


def test_summary_counts_what_the_file_holds(generated, text):
    path, summary = generated

    assert summary.path == path and summary.rows == ROWS and summary.seconds > 0
    assert summary.users == text["User"].nunique()
    assert summary.cards == text.groupby(["User", "Card"]).ngroups
    assert summary.merchants == text["Merchant Name"].nunique()
    assert summary.frauds == (text["Is Fraud?"] == "Yes").sum()


# ---------------------------------------------------------------- determinism and chunking


def test_same_seed_gives_identical_bytes_whatever_the_chunk_size(generated, tmp_path):
    again = tmp_path / "again.csv"
    small_chunks = tmp_path / "small_chunks.csv"
    synthetic.generate(again, ROWS, seed=7)
    synthetic.generate(small_chunks, ROWS, seed=7, chunk_rows=500)

    assert again.read_bytes() == generated[0].read_bytes()
    assert small_chunks.read_bytes() == generated[0].read_bytes()


def test_another_seed_gives_another_file(generated, tmp_path):
    other = tmp_path / "other.csv"
    synthetic.generate(other, ROWS, seed=8)

    assert other.read_bytes() != generated[0].read_bytes()


# ---------------------------------------------------------------- marginals


def test_marginals_scale_down_to_a_small_file(tmp_path):
    path = tmp_path / "tx.csv"
    summary = synthetic.generate(path, 100_000, seed=3)
    frame = read_transactions(path)
    fraud = frame["Is Fraud?"].astype(bool)
    year = frame["Year"]

    assert 0.0008 < summary.frauds / summary.rows < 0.002  # the real file: 0.122%
    assert not fraud[year == 2020].any()
    assert year.min() <= 1992 and year.max() == 2020
    assert (year > 2005).mean() > 0.6  # activity grows over the years
    assert (year == 2018).mean() > 0.03 and (year >= 2019).mean() > 0.03  # validation and test
    assert summary.users >= 8
    cards_per_user = frame.groupby("User", observed=True)["Card"].nunique()
    assert cards_per_user.min() >= 1 and cards_per_user.max() <= 9
    assert frame["MCC"].nunique() > 50 and set(frame["MCC"]) <= set(synthetic.MCCS)
    assert 0.05 < (frame["Use Chip"] == "Online Transaction").mean() < 0.25


@pytest.mark.parametrize("regime", synthetic.REGIMES)
def test_a_few_thousand_rows_still_have_fraud_in_every_split(tmp_path, regime):
    path = tmp_path / "tx.csv"
    summary = synthetic.generate(path, 3_000, seed=0, regime=regime)
    frame = read_transactions(path)
    fraud_years = frame.loc[frame["Is Fraud?"].astype(bool), "Year"]

    assert summary.users >= 5
    assert (fraud_years < 2018).any() and (fraud_years == 2018).any() and (fraud_years == 2019).any()
    assert not (fraud_years == 2020).any()


def test_full_scale_plan_matches_the_real_file_marginals(full_world):
    world = full_world
    fraud = world.planted["fraud"]

    assert world.user_card_start.size - 1 == 2_000
    assert 5_500 < world.card_user.size < 6_800
    assert world.merchant_name.size == synthetic.MERCHANTS_FULL
    assert abs(fraud.sum() - 29_757) < 300
    assert world.card_rows.sum() == synthetic.ROWS_FULL


def test_fraud_clusters_in_the_card_merchant_graph(text):
    fraud = text[text["Is Fraud?"] == "Yes"]
    card = fraud["User"] + "/" + fraud["Card"]
    cards_per_merchant = card.groupby(fraud["Merchant Name"]).nunique()
    shared = fraud["Merchant Name"].map(cards_per_merchant) >= 2
    rows_per_card = card.value_counts()

    # Most fraud happens at merchants where other cards see fraud too (rings, cash-out,
    # testing merchants), and fraud comes in bursts per card.
    assert shared.mean() > 0.5
    assert (rows_per_card >= 2).mean() > 0.5


# ---------------------------------------------------------------- errors and atomic output


@pytest.mark.parametrize("n_rows", [0, -5, 2.5, "100", True, None])
def test_invalid_row_count_is_a_clear_error_and_writes_nothing(tmp_path, n_rows):
    with pytest.raises(ValueError, match="n_rows must be an integer >= 1"):
        synthetic.generate(tmp_path / "tx.csv", n_rows)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, value", [("seed", -1), ("chunk_rows", 0)])
def test_invalid_seed_or_chunk_size_is_a_clear_error(tmp_path, name, value):
    with pytest.raises(ValueError, match=f"{name} must be an integer"):
        synthetic.generate(tmp_path / "tx.csv", 100, **{name: value})
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_is_a_clear_error_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the folder should be")

    with pytest.raises(OSError, match="choose an output path in a writable folder"):
        synthetic.generate(blocker / "tx.csv", 100)
    assert [p.name for p in tmp_path.iterdir()] == ["not_a_folder"]


def test_folder_as_output_path_is_a_clear_error(tmp_path):
    with pytest.raises(IsADirectoryError, match="give a file path"):
        synthetic.generate(tmp_path, 100)
    assert list(tmp_path.iterdir()) == []


def test_write_failing_midway_leaves_no_partial_file_and_keeps_the_old_one(tmp_path):
    # A real failure in the middle of writing: the process may not grow a file past 64 KiB.
    out = tmp_path / "tx.csv"
    out.write_text("previous complete file\n")
    script = textwrap.dedent(f"""
        import resource, signal
        from fraudlib import synthetic
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        try:
            synthetic.generate({str(out)!r}, 5000, chunk_rows=100)
        except OSError as exc:
            print("failed:", exc.errno)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    assert "failed: 27" in result.stdout, result.stderr  # EFBIG
    assert [p.name for p in tmp_path.iterdir()] == ["tx.csv"]
    assert out.read_text() == "previous complete file\n"


def test_no_temporary_file_is_left_after_success(generated):
    assert [p.name for p in generated[0].parent.iterdir()] == [generated[0].name]


# ---------------------------------------------------------------- command line


def test_command_line_help_describes_the_options():
    result = subprocess.run([sys.executable, "-m", "fraudlib.synthetic", "--help"],
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 0
    for option in ("--rows", "--out", "--seed", "--chunk-rows", "--regime", "row_only", "TabFormer", "--files"):
        assert option in result.stdout


def test_command_line_writes_the_same_file_as_the_function(tmp_path):
    out = tmp_path / "cli.csv"
    result = subprocess.run([sys.executable, "-m", "fraudlib.synthetic", "--rows", "2000", "--out", str(out),
                             "--seed", "4", "--quiet"], capture_output=True, text=True, timeout=120)
    synthetic.generate(tmp_path / "api.csv", 2000, seed=4)

    assert result.returncode == 0, result.stderr
    assert "2,000 rows" in result.stdout
    assert out.read_bytes() == (tmp_path / "api.csv").read_bytes()


def test_command_line_regime_writes_the_same_file_as_the_function(tmp_path):
    out = tmp_path / "cli.csv"
    result = subprocess.run([sys.executable, "-m", "fraudlib.synthetic", "--rows", "2000", "--out", str(out),
                             "--regime", "fraud_ring", "--quiet"], capture_output=True, text=True, timeout=120)
    synthetic.generate(tmp_path / "api.csv", 2000, regime="fraud_ring")

    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == (tmp_path / "api.csv").read_bytes()


def test_command_line_rejects_an_unknown_regime(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fraudlib.synthetic", "--rows", "100", "--regime", "rings",
                             "--out", str(tmp_path / "x.csv")], capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert "invalid choice: 'rings'" in result.stderr and "row_only" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_command_line_rejects_a_bad_row_count_with_a_message(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fraudlib.synthetic", "--rows", "0",
                             "--out", str(tmp_path / "x.csv")], capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert "n_rows must be an integer >= 1" in result.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- regimes, look-alikes, drift

REGIME_ROWS = 300_000


def _frame(path: Path) -> pd.DataFrame:
    """card, day, week, merchant, fraud, first (the card's first visit to the merchant), amount, online."""
    f = read_transactions(path)
    day = pd.to_datetime(f[["Year", "Month", "Day"]]).to_numpy().astype("datetime64[D]").astype(np.int64)
    out = pd.DataFrame({"card": f["User"].astype(np.int64).to_numpy() * 10 + f["Card"].astype(np.int64).to_numpy(),
                        "day": day, "merchant": f["Merchant Name"].to_numpy(),
                        "fraud": f["Is Fraud?"].astype(bool).to_numpy(), "year": f["Year"].to_numpy(),
                        "amount": f["Amount"].to_numpy(),
                        "online": (f["Use Chip"] == "Online Transaction").to_numpy(),
                        "city": f["Merchant City"].astype(str).to_numpy()})
    out["week"] = out["day"] // 7
    out["first"] = ~out.duplicated(["card", "merchant"])
    return out


@pytest.fixture(scope="module")
def regime_files(tmp_path_factory) -> dict[str, tuple[synthetic.SyntheticSummary, pd.DataFrame]]:
    where = tmp_path_factory.mktemp("regimes")
    out = {}
    for regime in synthetic.REGIMES:
        summary = synthetic.generate(where / f"{regime}.csv", REGIME_ROWS, seed=1, regime=regime)
        out[regime] = (summary, _frame(summary.path))
    return out


def _fraud_cards_per_merchant_week(frame: pd.DataFrame) -> pd.Series:
    fraud = frame[frame["fraud"]]
    return fraud.groupby(["merchant", "week"])["card"].nunique()


def _share_at_crowded_fraud_merchants(frame: pd.DataFrame, cards: int = 3) -> float:
    """Share of fraud rows at a merchant where at least `cards` cards commit fraud the same week."""
    fraud = frame[frame["fraud"]]
    per = _fraud_cards_per_merchant_week(frame)
    return float((fraud.set_index(["merchant", "week"]).index.map(per).to_numpy() >= cards).mean())


def _crowded_legit_merchants(frame: pd.DataFrame, cards: int = 10) -> np.ndarray:
    """Merchants without any fraud where at least `cards` cards came for the first time in one week."""
    new = frame[frame["first"]].groupby(["merchant", "week"])["card"].nunique()
    crowded = new[new >= cards].index.get_level_values("merchant").unique()
    return np.setdiff1d(crowded.to_numpy(), frame.loc[frame["fraud"], "merchant"].unique())


def _legit_bursts(frame: pd.DataFrame, merchants: int = 3) -> int:
    """Legitimate bursts: a card hits `merchants` merchants new to it within 3 days (no fraud among
    those rows), in person away from its home city."""
    home = frame[~frame["online"]].groupby("card")["city"].agg(lambda c: c.mode().iloc[0])
    away = frame[frame["first"] & ~frame["online"] & (frame["city"] != frame["card"].map(home))]
    window = [away["card"], away["day"] // 3]
    new = away.groupby(window)["merchant"].nunique()
    clean = ~away.groupby(window)["fraud"].any()
    return int(((new >= merchants) & clean).sum())


def test_regimes_are_named_and_an_unknown_one_is_a_clear_error(tmp_path):
    assert synthetic.REGIMES == ("default", "compromised_merchant", "fraud_ring", "card_testing", "row_only")
    with pytest.raises(ValueError, match="unknown regime 'rings'.*default, compromised_merchant, fraud_ring, "
                                         "card_testing, row_only"):
        synthetic.generate(tmp_path / "tx.csv", 1000, regime="rings")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("regime", synthetic.REGIMES)
def test_each_regime_is_deterministic_whatever_the_chunk_size(tmp_path, regime):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    synthetic.generate(a, ROWS, seed=5, regime=regime)
    synthetic.generate(b, ROWS, seed=5, regime=regime, chunk_rows=700)

    assert a.read_bytes() == b.read_bytes()
    assert read_transactions(a)["Is Fraud?"].sum() > 0


def test_the_regime_determines_the_file(tmp_path):
    contents = set()
    for regime in synthetic.REGIMES:
        synthetic.generate(tmp_path / f"{regime}.csv", ROWS, seed=5, regime=regime)
        contents.add((tmp_path / f"{regime}.csv").read_bytes())

    assert len(contents) == len(synthetic.REGIMES)
    synthetic.generate(tmp_path / "plain.csv", ROWS, seed=5)
    assert (tmp_path / "plain.csv").read_bytes() == (tmp_path / "default.csv").read_bytes()


def test_every_regime_keeps_the_fraud_budget_of_each_period(regime_files):
    periods = {}
    for regime, (summary, frame) in regime_files.items():
        years = frame.loc[frame["fraud"], "year"]
        periods[regime] = ((years < 2018).sum(), (years == 2018).sum(), (years == 2019).sum(), (years == 2020).sum())
        assert summary.rows == REGIME_ROWS

    expected = periods["default"]
    assert expected[1] >= 15 and expected[2] >= 15 and expected[3] == 0
    assert all(p == expected for p in periods.values()), periods


def test_row_only_fraud_has_no_graph_structure(regime_files):
    frame = regime_files["row_only"][1]
    fraud = frame[frame["fraud"]].sort_values(["card", "day"])

    # No merchant sees fraud from more than a couple of cards in a week, and no card gets a burst.
    assert _fraud_cards_per_merchant_week(frame).max() <= 2
    gaps = fraud.groupby("card")["day"].diff()
    assert (gaps <= 3).mean() < 0.05
    # Fraud goes where the card's holder shops anyway: mostly merchants the card already knows.
    assert fraud["first"].mean() < 0.25


def test_fraud_ring_fraud_concentrates_on_few_merchants_shared_by_several_cards(regime_files):
    frame = regime_files["fraud_ring"][1]
    fraud = frame[frame["fraud"]]

    assert _share_at_crowded_fraud_merchants(frame) > 0.6
    assert fraud["merchant"].nunique() < 0.5 * len(fraud)
    assert _share_at_crowded_fraud_merchants(regime_files["row_only"][1]) == 0.0


def test_card_testing_starts_with_small_online_charges_at_shared_merchants(regime_files):
    frame = regime_files["card_testing"][1]
    fraud = frame[frame["fraud"]]
    dollars = fraud["amount"].astype(float)
    tests = fraud[fraud["online"] & (dollars < 10)]

    assert len(tests) > 0.15 * len(fraud)
    assert tests.groupby("merchant")["card"].nunique().max() >= 3
    # Each tested card goes on to larger fraud.
    later = fraud[dollars >= 10].groupby("card")["day"].max()
    tested = tests.groupby("card")["day"].min()
    assert (later.reindex(tested.index) >= tested).mean() > 0.7


def test_compromised_merchant_victims_share_an_earlier_legitimate_merchant(regime_files):
    def shared_share(frame: pd.DataFrame) -> float:
        """Share of fraud cards that, in the 90 days before their first fraud, first visited a
        merchant that at least 3 other fraud cards also first visited within the same two weeks."""
        fraud = frame[frame["fraud"]]
        first_fraud = fraud.groupby("card")["day"].min()
        before = frame[~frame["fraud"] & frame["first"] & frame["card"].isin(first_fraud.index)]
        start = before["card"].map(first_fraud)
        before = before[(before["day"] < start) & (before["day"] >= start - 90)]
        key = [before["merchant"], before["day"] // 14]
        victims = before.groupby(key)["card"].transform("nunique")
        return before.loc[victims >= 4, "card"].nunique() / first_fraud.size

    assert shared_share(regime_files["compromised_merchant"][1]) > 0.5
    assert shared_share(regime_files["row_only"][1]) < 0.1


@pytest.mark.parametrize("regime", synthetic.REGIMES)
def test_legitimate_look_alikes_crowd_like_fraud_in_every_regime(regime_files, regime):
    frame = regime_files[regime][1]

    # Promotions and openings: merchants without fraud that many cards visit for the first time
    # in one week; trips: cards without fraud that hit several new merchants away from home in days.
    assert _crowded_legit_merchants(frame).size >= 3
    assert _legit_bursts(frame) >= 10


@pytest.fixture(scope="module")
def full_world():
    # The plan only (users, cards, merchants, planted rows): no 24M-row file is written.
    return synthetic._build_world(synthetic.ROWS_FULL, seed=0)


def test_look_alike_events_outnumber_fraud_campaigns_every_year(full_world):
    year = synthetic._YEAR_OF_DAY
    stats = full_world.stats
    campaigns = np.concatenate([stats[name] for name in ("compromised_merchant", "fraud_ring", "card_testing")])
    crowds = np.concatenate([stats["promotion"], stats["event"]])

    for y in range(2000, 2020):
        assert (year[crowds] == y).sum() >= (year[campaigns] == y).sum(), y
        assert (year[stats["trip"]] == y).sum() >= 10 * (year[campaigns] == y).sum(), y


def test_fraud_mechanisms_drift_over_the_years(full_world):
    year = synthetic._YEAR_OF_DAY
    stats = full_world.stats
    counts = {name: np.bincount(year[stats[name]] - 1991, minlength=30)
              for name in ("compromised_merchant", "fraud_ring", "card_testing")}
    total = sum(counts.values())
    early, late = slice(0, 2010 - 1991), slice(2015 - 1991, 2020 - 1991)
    testing = counts["card_testing"]
    assert testing[late].sum() / total[late].sum() > 2 * testing[early].sum() / total[early].sum()

    # Fraud moves online: the share of fraud rows at online merchants grows.
    planted = full_world.planted
    fraud_year = year[planted["day"][planted["fraud"]]]
    online = full_world.merchant_kind[planted["merchant"][planted["fraud"]]] == synthetic.KIND_ONLINE
    assert online[fraud_year >= 2015].mean() > online[fraud_year < 2010].mean() + 0.15


# ---------------------------------------------------------------- several files


def _rows_of(path: Path) -> bytes:
    header, rows = path.read_bytes().split(b"\n", 1)
    assert header.decode() + "\n" == synthetic.HEADER
    return rows


def test_several_files_hold_the_single_files_rows_in_name_order_in_equal_parts(tmp_path):
    synthetic.generate(tmp_path / "one.csv", 10_000, seed=2, chunk_rows=3_000)

    summary = synthetic.generate(tmp_path / "parts", 10_000, seed=2, chunk_rows=3_000, files=3)

    assert summary.path == tmp_path / "parts" and summary.rows == 10_000
    assert [p.name for p in summary.files] == ["part-0000.csv", "part-0001.csv", "part-0002.csv"]
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == [p.name for p in summary.files]
    assert [_rows_of(p).count(b"\n") for p in summary.files] == [3_333, 3_333, 3_334]
    assert b"".join(_rows_of(p) for p in summary.files) == _rows_of(tmp_path / "one.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.csv", "parts"]  # no temporary folder left


def test_the_parts_read_as_one_file(tmp_path):
    summary = synthetic.generate(tmp_path / "parts", 5_000, seed=1, files=4)
    synthetic.generate(tmp_path / "one.csv", 5_000, seed=1)

    parts = pd.concat([read_transactions(p) for p in summary.files], ignore_index=True)

    pd.testing.assert_frame_equal(parts.astype(str), read_transactions(tmp_path / "one.csv").astype(str))


def test_generating_parts_again_replaces_the_earlier_runs_parts(tmp_path):
    synthetic.generate(tmp_path / "parts", 2_000, files=4)

    summary = synthetic.generate(tmp_path / "parts", 2_000, seed=5, files=2)

    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["part-0000.csv", "part-0001.csv"]
    synthetic.generate(tmp_path / "one.csv", 2_000, seed=5)
    assert b"".join(_rows_of(p) for p in summary.files) == _rows_of(tmp_path / "one.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.csv", "parts"]


def test_parts_into_a_folder_holding_other_files_or_onto_a_file_are_refused(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine\n")
    (tmp_path / "file.csv").write_text("a file\n")

    with pytest.raises(FileExistsError, match="holds other files \\(notes.txt\\)"):
        synthetic.generate(tmp_path / "data", 1_000, files=2)
    with pytest.raises(NotADirectoryError, match="with several files give a folder path"):
        synthetic.generate(tmp_path / "file.csv", 1_000, files=2)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "file.csv"]
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("files, message", [(0, "files must be an integer >= 1"), (11, "files must be at most n_rows")])
def test_an_invalid_file_count_is_a_clear_error_and_writes_nothing(tmp_path, files, message):
    with pytest.raises(ValueError, match=message):
        synthetic.generate(tmp_path / "parts", 10, files=files)
    assert list(tmp_path.iterdir()) == []


def test_parts_failing_midway_leave_the_earlier_parts_and_no_partial_folder(tmp_path):
    out = tmp_path / "parts"
    synthetic.generate(out, 1_000, files=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    script = textwrap.dedent(f"""
        import resource, signal
        from fraudlib import synthetic
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        try:
            synthetic.generate({str(out)!r}, 5000, chunk_rows=100, files=2)
        except OSError as exc:
            print("failed:", exc.errno)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    assert "failed: 27" in result.stdout, result.stderr  # EFBIG
    assert [p.name for p in tmp_path.iterdir()] == ["parts"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_command_lines_write_the_same_parts_as_the_function(tmp_path):
    synthetic.generate(tmp_path / "api", 3_000, seed=4, files=3)
    for name, command in (("module", [sys.executable, "-m", "fraudlib.synthetic", "--quiet"]),
                          ("fraud", [sys.executable, "-m", "fraudlib.cli", "generate"])):
        result = subprocess.run([*command, "--rows", "3000", "--seed", "4", "--files", "3",
                                 "--out", str(tmp_path / name)], capture_output=True, text=True, timeout=120)

        assert result.returncode == 0, result.stderr
        assert {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()} == \
            {p.name: p.read_bytes() for p in (tmp_path / "api").iterdir()}
    assert "3 files" in subprocess.run(
        [sys.executable, "-m", "fraudlib.synthetic", "--quiet", "--rows", "30", "--files", "3",
         "--out", str(tmp_path / "again")], capture_output=True, text=True, timeout=120).stdout
