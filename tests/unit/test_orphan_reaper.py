"""The orphan reaper (services/core/orphan_reaper.py) on real processes: a SIGKILLed "driver"
leaves a child that does not follow it (as Ray's agents do); the reaper kills that child, and
nothing it did not see below the driver. The real run's case (Ray's processes after a SIGKILL
of `flywheel train`) is tests/e2e/test_resume.py."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from services.core.orphan_reaper import POLL_S, start_reaper

DRIVER = ("import subprocess, time; child = subprocess.Popen(['sleep', '600'], start_new_session=True); "
          "print(child.pid, flush=True); time.sleep(600)")


def test_a_killed_drivers_leftover_child_is_killed_and_nothing_else():
    bystander = subprocess.Popen(["sleep", "600"])  # not below the driver
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    try:
        leftover = psutil.Process(int(driver.stdout.readline()))
        reaper = start_reaper(driver.pid)
        time.sleep(3 * POLL_S)  # the reaper has seen the driver's child
        driver.kill()
        driver.wait()
        time.sleep(0.5)
        assert leftover.is_running() and leftover.status() != psutil.STATUS_ZOMBIE  # it did not follow the driver
        _, alive = psutil.wait_procs([leftover], timeout=30)
        assert not alive, "the reaper left the dead driver's child running"
        assert reaper.wait(timeout=30) == 0
        assert bystander.poll() is None  # a process outside the driver's tree is left alone
    finally:
        for process in (bystander, driver):
            process.kill()


def test_after_a_normal_exit_the_reaper_just_ends():
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    reaper = start_reaper(driver.pid)
    driver.wait()
    assert reaper.wait(timeout=30) == 0
