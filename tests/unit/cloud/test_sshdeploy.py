from salt_kvm.cloud.sshdeploy import Bundle, _as_root, command_line, working_dir


def test_legacy_deploy_command_gets_exactly_the_directory_it_names():
    assert working_dir("/tmp/.saltcloud", "sh /tmp/.saltcloud/deploy.sh") == "/tmp/.saltcloud"


def test_default_is_a_private_random_directory_like_salt_cloud():
    one, two = working_dir("/tmp/.saltcloud/", None), working_dir("/tmp/.saltcloud", None)
    assert one.startswith("/tmp/.saltcloud-") and one != two


def test_bootstrap_style_commands_get_the_directory_and_script_args():
    bundle = Bundle(bootstrap_style=True, force_minion_config=True, script_args="-F -x python3")
    assert command_line(bundle, "/tmp/d") == "/tmp/d/deploy.sh -c /tmp/d -F -F -x python3"


def test_custom_command_and_args():
    bundle = Bundle(deploy_command="sh /tmp/.saltcloud/deploy.sh", script_args="-F")
    assert command_line(bundle, "/tmp/.saltcloud") == "sh /tmp/.saltcloud/deploy.sh -F"


def test_sudo_wrapping_quotes_the_command():
    assert _as_root(Bundle(), "a 'b'") == "a 'b'"
    assert _as_root(Bundle(sudo=True), "echo hi") == "sudo -n sh -c 'echo hi'"
    assert _as_root(Bundle(sudo=True, sudo_password="pw"), "echo hi").startswith("sudo -S -p ''")
