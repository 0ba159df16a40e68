"""`python -m dsa_ext`: what this install is and which kernel each op runs here (dsa_ext.env)."""
from dsa_ext.env import main

main()
