"""The tutorial's house rules, checked on every notebook so they cannot erode:
a one-line `> ` description (nbdev makes its first line the module docstring), a `#| default_exp`,
exported cells that fit on a screen, no long stretch of exported code without a check, a hidden cell of
test imports, and a final `nbdev_export` cell. Usage: python .ci/notebooks.py [--report]"""
import json, re, sys
from pathlib import Path

MAX_CELL_LINES = 45    # "about 40 lines": a screen
MAX_UNCHECKED_LINES = 80  # exported lines in a row before a demonstration cell must appear

def exported(src): return re.match(r'\s*#\|\s*export\b', src) is not None

def problems(path: Path) -> list[str]:
    cells = json.loads(path.read_text(encoding='utf-8'))['cells']
    sources = [''.join(c['source']) for c in cells]
    code = [s for c, s in zip(cells, sources) if c['cell_type'] == 'code']
    found = []
    title = sources[0] if cells and cells[0]['cell_type'] == 'markdown' else ''
    description = [l for l in title.splitlines() if l.startswith('>')]
    if len(description) != 1: found.append(f'the title cell needs exactly one `> ` description line, found {len(description)}')
    if path.stem == 'index': return found
    if not any(s.lstrip().startswith('#| default_exp') for s in code): found.append('no `#| default_exp` cell')
    if not code or 'nbdev_export()' not in code[-1]: found.append('the last code cell is not `#| hide` + nbdev_export()')
    if not any(s.lstrip().startswith('#| hide') and re.search(r'^\s*(from|import) ', s, re.M) for s in code):
        found.append('no hidden cell of test imports')
    run = 0
    for s in code:
        lines = s.count('\n') + 1
        if exported(s):
            if lines > MAX_CELL_LINES: found.append(f'an exported cell of {lines} lines (at most {MAX_CELL_LINES}): {s.splitlines()[1][:60]!r}')
            run += lines
            if run > MAX_UNCHECKED_LINES:
                found.append(f'{run} exported lines without a check before {s.splitlines()[1][:60]!r}'); run = 0
        elif s.strip() and not s.lstrip().startswith('#| hide'): run = 0
    return found

if __name__ == '__main__':
    bad = {p: problems(p) for p in sorted(Path('nbs').glob('*.ipynb'))}
    bad = {p: f for p, f in bad.items() if f}
    for p, found in bad.items():
        for f in found: print(f'{p}: {f}')
    sys.exit(1 if bad and '--report' not in sys.argv else 0)
