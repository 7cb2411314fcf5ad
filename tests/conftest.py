"""What every test file shares: one in-process runner of the `thne` command, the check of the one-line error
contract, and a small data set written once per module."""
import contextlib, io

import pytest

from thne_nb.cli import main
from thne_nb.data import make_default, write_mmsa


def thne(*argv):
    "Run `thne ARGV` in process: (exit status, stdout, stderr). Any exception other than SystemExit fails the test."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: main([str(a) for a in argv]); status = 0
        except SystemExit as done: status = done.code
    return status, out.getvalue(), err.getvalue()


def run_cli(argv, capsys=None):
    "`thne(*argv)` for call sites that hold the arguments as a list (capsys is accepted and not needed)."
    return thne(*argv)


def assert_one_line_error(status, err, *fragments):
    "The error contract: exit status 2 and exactly one line `thne: error: ...` holding every fragment."
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('thne: error: '), err
    for fragment in fragments: assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope='module')
def small_data(tmp_path_factory):
    "The embedded default's generator at 40 clips (24 train, 4 valid, 12 test), as an MMSA pickle."
    path = tmp_path_factory.mktemp('data') / 'small.pkl'
    write_mmsa(make_default(n_clips=40, seed=0), path)
    return path
