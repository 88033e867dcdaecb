#!/usr/bin/env python3
"""Prints a claim statement of src/claim.rs (CLAIM by default, or the constant named by
the second argument) as the compiler builds it: its concat! of string literals and of
the macro_rules! fragments those name."""
import re
import sys

source = open(sys.argv[1]).read()
name = sys.argv[2] if len(sys.argv) > 2 else "CLAIM"


def literal(text):
    return bytes(text, "utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")


macros = {
    m.group(1): literal(m.group(2))
    for m in re.finditer(
        r'macro_rules! (\w+) \{\s*\(\) => \{\s*"(.*?)"\s*\};\s*\}', source, re.S
    )
}
body = re.search(r"pub const %s: &str = concat!\((.*?)\n\);" % name, source, re.S).group(1)
parts = re.findall(r'(\w+)!\(\)|"((?:[^"\\]|\\.)*)"', body, re.S)
print("".join(macros[m] if m else literal(s) for m, s in parts))
