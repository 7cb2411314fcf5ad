"""Write README.md from nbs/index.ipynb (nbdev's own `nbdev_readme` needs Quarto, which we do not require).

`python .ci/readme.py` writes it; `python .ci/readme.py --check` fails when README.md is stale."""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def render(nb_path):
    cells = json.loads(nb_path.read_text(encoding='utf-8'))['cells']
    parts, prev = [], None
    for cell in cells:
        src = ''.join(cell['source'])
        lines = src.splitlines()
        directives = [l for l in lines if l.startswith('#|')]
        if any('hide' in d for d in directives): continue
        body = '\n'.join(l for l in lines if not l.startswith('#|')).strip()
        if not body: continue
        if cell['cell_type'] == 'markdown': parts.append(body)
        elif cell['cell_type'] == 'code':
            # an import cell and the code after it (split so the docs build runs only the imports) read as one block
            if parts and parts[-1].startswith('```python\n') and prev == 'code': parts[-1] = parts[-1][:-4] + f'\n\n{body}\n```'
            else: parts.append(f'```python\n{body}\n```')
        prev = cell['cell_type']
    return '<!-- Generated from nbs/index.ipynb by .ci/readme.py: edit the notebook, not this file. -->\n\n' + '\n\n'.join(parts) + '\n'

if __name__ == '__main__':
    text = render(root / 'nbs' / 'index.ipynb')
    readme = root / 'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text(encoding='utf-8') != text:
            sys.exit('README.md is stale: run `python .ci/readme.py` (make readme) and commit it')
    else:
        readme.write_text(text, encoding='utf-8')
