import sys
from pathlib import Path

# deploylib sits beside the tests.
sys.path.insert(0, str(Path(__file__).parent))
