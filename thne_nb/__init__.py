__version__ = "0.1.0"

# Written by hand below the version line (nbdev rewrites only that line). The names a notebook user reaches for
# first, imported on first use so that `import thne_nb` stays instant; chapter 13 (nbs/13_predict.ipynb) documents
# them. `train` and `predict` are also module names: those modules are callable, so the module is returned.
import importlib as _importlib

_API = {'get_config': 'thne_nb.config', 'load_dataset': 'thne_nb.data', 'train': 'thne_nb.train',
        'predict': 'thne_nb.predict', 'load_pretrained': 'thne_nb.predict'}
__all__ = ['__version__', *_API]

def __getattr__(name):
    if name not in _API: raise AttributeError(f"module 'thne_nb' has no attribute {name!r}")
    module = _importlib.import_module(_API[name])
    return module if module.__name__ == f'thne_nb.{name}' else getattr(module, name)

def __dir__(): return sorted(set(globals()) | set(_API))
