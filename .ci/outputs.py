"""Run notebooks in place so that they are committed with their outputs (the tutorial shows an output under
its cells), skipping what nbdev_test skips: cells flagged with settings.ini's tst_flags (gpu, slow),
`#| eval: false` cells and the final nbdev_export cell. Usage: python .ci/outputs.py nbs/05_model.ipynb ..."""
import os, re, sys
from configparser import ConfigParser
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell

def skip_flags() -> set[str]:
    settings = ConfigParser(); settings.read(Path(__file__).parents[1]/'settings.ini')
    return set(settings['DEFAULT'].get('tst_flags', '').replace('|', ' ').split())

def skipped(cell, flags) -> bool:
    if cell.cell_type != 'code' or 'nbdev_export(' in cell.source: return True
    directives = re.findall(r'^\s*#\|\s*([\w-]+)(.*)$', cell.source, re.M)
    return any(name in flags or (name == 'eval' and value.strip(' :').lower() == 'false') for name, value in directives)

def run(path: Path, flags: set[str]):
    nb = read_nb(path)
    for cell in nb.cells:
        if cell.cell_type == 'code' and skipped(cell, flags): cell.outputs = []
    os.environ['IN_TEST'] = '1'
    shell = CaptureShell(path)
    cwd = Path.cwd(); os.chdir(path.parent)
    try: shell.run_all(nb, exc_stop=True, preproc=lambda cell: skipped(cell, flags))
    finally: os.chdir(cwd)
    write_nb(nb, path)

if __name__ == '__main__':
    flags = skip_flags()
    for name in sys.argv[1:]:
        print(f'running {name}', flush=True); run(Path(name).resolve(), flags)
