"""The Ansible playbook and roles of `fleet deploy`, shipped inside the package as data."""
