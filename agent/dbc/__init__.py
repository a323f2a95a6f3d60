"""DBC files, compiled once into the flat tables the fusion kernel decodes with.

It owns reading a DBC (through cantools, the one place that library is imported), the
maker profiles in profiles/ and the compile cache. It imports only agent.errors and
agent.signals (the catalogue the DBC signals map onto); the kernel never sees a DBC.
"""
