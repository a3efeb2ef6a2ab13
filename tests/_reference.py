"""Where the released Extract+Think code may sit next to this repository (a checkout of the release's repo in
../shared/reference/seed_repo). Tests that compare with it skip, saying so, when it is not there."""
import os

SEED_REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                                          "reference", "seed_repo"))
