"""CI run of the CLI bad-input corpus fuzzer (tests/cli_fuzz.py): seeded, bounded by
GATE2DEPLOY_FUZZ_SECONDS (default 60 s of random draws after one pass over every
(kind, damage) pair). Prints the per-kind table with -s."""
import os

from cli_fuzz import fuzz, table


def test_cli_bad_input_corpus(tmp_path):
    seconds = float(os.environ.get("GATE2DEPLOY_FUZZ_SECONDS", "60"))
    seed = int(os.environ.get("GATE2DEPLOY_FUZZ_SEED", "0"))
    outcomes = fuzz(tmp_path / "corpus", seconds, seed)
    print("\n" + table(outcomes))
    failures = [f for o in outcomes.values() for f in o.failures]
    assert sum(o.tried for o in outcomes.values()) > 0
    assert not failures, "\n".join(failures[:20])
