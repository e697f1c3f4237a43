"""The commands as linear recipes: check every input, set up the roles, run, clean up."""
