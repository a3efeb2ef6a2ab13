"""Where the released Extract+Think code may be: the folder in $EXTRACT_THINK_RELEASE, else a checkout of the
release's repository at <any folder next to this repository>/reference/seed_repo. Tests that compare with it
skip, saying so, when it is in neither place."""
import glob
import os

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NEXT_TO_REPO = sorted(glob.glob(os.path.join(os.path.dirname(_REPO), "*", "reference", "seed_repo")))
SEED_REPO = os.environ.get("EXTRACT_THINK_RELEASE") or (_NEXT_TO_REPO[0] if _NEXT_TO_REPO else
                                                         os.path.join(_REPO, "..", "reference", "seed_repo"))
