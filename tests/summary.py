"""What tests/run.sh prints at its end: per suite, its wall time, its counts and its ten
slowest tests, read from the JUnit XML that each pytest run wrote."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET

SLOWEST = 10


def summarize(label: str, seconds: str, xml_path: str) -> None:
    if not xml_path:  # a step without tests, e.g. creating a venv
        print(f"=== {label}: {seconds} s")
        return
    try:
        suite = ET.parse(xml_path).getroot().find("testsuite")
    except (OSError, ET.ParseError) as error:
        print(f"=== {label}: {seconds} s, no report ({error})")
        return
    cases = [
        (float(case.get("time", 0)), f"{case.get('classname')}::{case.get('name')}")
        for case in suite.iter("testcase")
    ]
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    print(
        f"=== {label}: {seconds} s, {passed} passed, {counts['failures']} failed, "
        f"{counts['errors']} errors, {counts['skipped']} skipped"
    )
    for duration, name in sorted(cases, reverse=True)[:SLOWEST]:
        print(f"    {duration:7.1f} s  {name}")


if __name__ == "__main__":
    arguments = sys.argv[1:]
    for i in range(0, len(arguments), 3):
        summarize(*arguments[i : i + 3])
