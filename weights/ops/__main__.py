"""`python3 -m weights.ops --out models/ops.pt`: script the ops module and save it atomically."""
from weights.ops import main

main()
