"""Data that travels inside the saesteer wheel: the prompt CSVs and the project's SAEs.

In the repository this is the top-level ``storage/`` folder; installed, it is the ``saesteer.storage``
package. Find its files with :func:`saesteer.data.package_files.storage_path`, never by a path relative to
the repository.
"""
