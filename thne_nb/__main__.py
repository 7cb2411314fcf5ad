"`python -m thne_nb ...` runs the `thne` command line (written by hand: nbdev leaves this file alone)."
from thne_nb.cli import main

if __name__ == '__main__': main()
