"""The magic-link sign-in demo: a sign-in mail sent in the background, never twice, and never
after its deadline. Start it with `python -m examples.magic_link`; see README.md."""
