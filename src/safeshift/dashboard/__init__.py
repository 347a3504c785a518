"""The web dashboard and the rollout report: pages rendered on the server, plain SVG charts."""
