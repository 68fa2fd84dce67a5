#!/usr/bin/env python3
"""Compares an Autobahn fuzzingclient index.json with the committed expected
results, case by case (behavior and behaviorClose).

    compare.py INDEX EXPECTED            exit 1 on any difference or an empty index
    compare.py INDEX EXPECTED --update   rewrite EXPECTED from INDEX

Prints each difference, then one summary line:
    autobahn: 301 cases, 0 differences (OK 290, NON-STRICT 8, INFORMATIONAL 3)
"""

import collections
import json
import sys

FIELDS = ("behavior", "behaviorClose")
SHOWN_DIFFERENCES = 40


def case_order(case):
    return tuple(int(part) for part in case.split("."))


def load_results(path):
    try:
        with open(path) as file:
            index = json.load(file)
    except (OSError, ValueError) as error:
        sys.exit(f"autobahn: no usable results in {path}: {error}")
    # {agent: {case: {"behavior", "behaviorClose", ...}}}; one agent here.
    cases = {}
    for agent_cases in index.values():
        for case, result in agent_cases.items():
            cases[case] = {field: result[field] for field in FIELDS}
    return cases


def main(argv):
    if len(argv) not in (3, 4) or (len(argv) == 4 and argv[3] != "--update"):
        sys.exit(__doc__)
    actual = load_results(argv[1])
    if not actual:
        sys.exit(f"autobahn: 0 cases in {argv[1]}: the suite could not reach the server")
    counts = collections.Counter(result["behavior"] for result in actual.values())
    breakdown = ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))

    if len(argv) == 4:
        # One case per line, so that a change reads as a one-line diff.
        lines = [
            f"  {json.dumps(case)}: {json.dumps(actual[case])}"
            for case in sorted(actual, key=case_order)
        ]
        with open(argv[2], "w") as file:
            file.write("{\n" + ",\n".join(lines) + "\n}\n")
        print(f"autobahn: {len(actual)} cases written to {argv[2]} ({breakdown})")
        return 0

    with open(argv[2]) as file:
        expected = json.load(file)
    differences = []
    for case in sorted(set(actual) | set(expected), key=case_order):
        if case not in actual:
            differences.append(f"{case}: expected {expected[case]}, not run")
        elif case not in expected:
            differences.append(f"{case}: got {actual[case]}, not in the expected results")
        else:
            for field in FIELDS:
                if actual[case][field] != expected[case][field]:
                    differences.append(
                        f"{case}: {field} {actual[case][field]}, expected {expected[case][field]}"
                    )
    for difference in differences[:SHOWN_DIFFERENCES]:
        print(f"autobahn: {difference}")
    if len(differences) > SHOWN_DIFFERENCES:
        print(f"autobahn: ... and {len(differences) - SHOWN_DIFFERENCES} more")
    print(f"autobahn: {len(actual)} cases, {len(differences)} differences ({breakdown})")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
