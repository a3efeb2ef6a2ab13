"""Speed scripts, each printing a markdown table (ratios in one run): python -m bench.<name> from the repository root."""
