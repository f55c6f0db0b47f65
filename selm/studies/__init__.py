"""Several runs side by side: the demo, the alpha sweep, their report and analyses, the demo task."""
