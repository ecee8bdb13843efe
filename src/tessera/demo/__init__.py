"""The Gradio demo over every generator (`tessera demo`): `app` builds the page and serves it,
`progress` streams previews while sampling, `browser` finds or installs the headless browser
the demo's browser tests drive (`tessera setup browser`). Import `tessera.demo.app` for the page
(it needs the `demo` extra, gradio)."""
