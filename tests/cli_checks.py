"""Shared by the bad-input tests: what every refused command must look like."""


def assert_one_line_exit_2(result, *words, absent=()):
    """exit 2, exactly one stderr line, containing every word and none of `absent`; returns it."""
    code, stdout, err = result
    assert code == 2, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    for w in absent:
        assert w not in lines[0], lines[0]
    return lines[0]
