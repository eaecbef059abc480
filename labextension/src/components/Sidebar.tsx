import * as React from 'react';
import { ReactWidget, UseSignal } from '@jupyterlab/ui-components';

import { NSMLModel } from '../model';
import { ISidebarSettings } from '../tokens';
import { IActions } from './actions';
import { Header } from './Header';
import { SessionsTab } from './SessionsTab';
import { DatasetsTab } from './DatasetsTab';
import { LeaderboardsTab } from './LeaderboardsTab';

export type TabName = 'sessions' | 'datasets' | 'leaderboards';
const TITLES: [TabName, string][] = [
  ['sessions', 'Sessions'],
  ['datasets', 'Datasets'],
  ['leaderboards', 'Leaderboards']
];

/** The left-area panel: the balance header and the tabs the settings enable. */
export class SidebarWidget extends ReactWidget {
  constructor(
    readonly model: NSMLModel,
    private readonly actions: IActions,
    private settings: ISidebarSettings
  ) {
    super();
    this.addClass('jp-NSML-sidebar');
  }

  /** Show a tab (and, for sessions, open one session's row). */
  showTab(tab: TabName, focus: { session?: string; dataset?: string } = {}): void {
    this._tab = tab;
    if (focus.session) {
      this._focus = focus.session;
    }
    if (focus.dataset) {
      this._board = focus.dataset;
    }
    this.update();
  }

  setSettings(settings: ISidebarSettings): void {
    this.settings = settings;
    this.update();
  }

  protected render(): JSX.Element {
    return (
      <UseSignal signal={this.model.changed}>
        {() => {
          const tabs = TITLES.filter(([k]) => this.settings.tabs[k]);
          const tab = tabs.some(([k]) => k === this._tab) ? this._tab : (tabs[0]?.[0] ?? null);
          return (
            <div className="jp-NSML-panel">
              <Header model={this.model} onRefresh={() => this.actions.refresh()} />
              {this.model.error && (
                <div className="jp-NSML-error" role="alert">
                  {this.model.error}
                </div>
              )}
              <div className="jp-NSML-tabs" role="tablist">
                {tabs.map(([k, title]) => (
                  <button
                    key={k}
                    role="tab"
                    aria-selected={tab === k}
                    className={`jp-NSML-tabbutton ${tab === k ? 'jp-mod-current' : ''}`}
                    onClick={() => this.showTab(k)}
                  >
                    {title}
                  </button>
                ))}
              </div>
              <div className="jp-NSML-tabbody" role="tabpanel">
                {tab === 'sessions' && (
                  <SessionsTab model={this.model} actions={this.actions} focus={this._focus} />
                )}
                {tab === 'datasets' && <DatasetsTab model={this.model} actions={this.actions} />}
                {tab === 'leaderboards' && (
                  <LeaderboardsTab
                    model={this.model}
                    dataset={this._board}
                    onDataset={d => this.showTab('leaderboards', { dataset: d })}
                  />
                )}
              </div>
            </div>
          );
        }}
      </UseSignal>
    );
  }

  private _tab: TabName = 'sessions';
  private _focus: string | null = null;
  private _board: string | null = null;
}
